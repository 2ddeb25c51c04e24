"""Multi-turn episodes on one KV cache against one teacher-forced forward pass over the final transcript.

The oracle: `model(prompt + transcript, 0..L-1)` computed from scratch. If the cache ever held a stale
token, a token at the wrong position, or missed one, the log-probs of later model tokens (and greedy
choices) would differ from it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fd_jax.data.char_tokenizer import build_char_tokenizer
from fd_jax.models.config import ModelConfig
from fd_jax.models.transformer import Transformer
from fd_jax.rollout.episodes import END_ANSWER, END_LENGTH, END_SUBMIT, END_TURNS, Reaction, run_episodes

TOK = build_char_tokenizer()
ENC = lambda s: TOK.encode(s, add_special_tokens=False)  # noqa: E731
DEC = lambda ids: TOK.decode(ids, skip_special_tokens=True)  # noqa: E731
EOS = TOK.eos_token_id
CALL = re.compile(r"<t>(.*?)</t>", re.S)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(family="llama", vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    # larger weights than the 0.02 init, so that log-probs are far from uniform and positions matter
    state = nnx.state(m, nnx.Param)
    nnx.update(m, jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, state))
    return m


class ScriptedEnv:
    """`<t>x</t>` -> observation `[x!]`; `<t>submit</t>` or an answer ended by EOS closes the episode."""

    def __init__(self):
        self.seen = []

    def react(self, rows, texts, ended):
        self.seen.append(list(rows))
        out = []
        for text, stop in zip(texts, ended):
            calls = CALL.findall(text)
            if stop or not calls:
                out.append(Reaction(done=True))
            elif calls[-1] == "submit":
                out.append(Reaction(done=True, call={"name": "submit"}))
            else:
                out.append(Reaction(observation=f"[{calls[-1]}!]", call={"name": "echo", "arguments": calls[-1]}))
        return out


def _oracle(model, prompt, transcript):
    """f64 log-probs of every transcript token and the greedy choice before it, from one forward pass."""
    full = list(prompt) + list(transcript)
    logits = model(jnp.asarray([full]), jnp.arange(len(full))[None])[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
    rows = np.arange(len(prompt) - 1, len(full) - 1)
    return logp[rows, np.asarray(transcript)], logp[rows].argmax(-1)


PROMPTS = [ENC("Q: add 2 and 3?\n"), ENC("Hi\n"), ENC("Q: a longer prompt here, ok\n")]
SCRIPTS = [  # per row, per turn: the forced tokens
    [ENC("think<t>ab</t>"), ENC("so<t>c</t>"), ENC("5") + [EOS]],
    [ENC("x") + [EOS]],
    [ENC("<t>long call</t>"), ENC("<t>submit</t>")],
]


def _check_against_oracle(model, prompts, n, out, greedy):
    for b in range(len(prompts) * n):
        prompt, toks, mask = prompts[b // n], out.tokens[b], np.asarray(out.mask[b])
        assert len(toks) == len(mask) == len(out.logprobs[b])
        want_lp, want_argmax = _oracle(model, prompt, toks)
        got = np.asarray(out.logprobs[b])
        np.testing.assert_allclose(got[mask == 1], want_lp[mask == 1], atol=1e-5, rtol=0)
        assert np.all(got[mask == 0] == 0)
        if greedy:
            return want_argmax, mask
    return None


@pytest.mark.parametrize("device_stops", [True, False], ids=["device_stop", "host_cut"])
def test_scripted_episodes_equal_one_forward_pass(model, device_stops):
    env = ScriptedEnv()
    out = run_episodes(model, PROMPTS, env, decode=DEC, encode=ENC, n=1, max_turns=4, max_turn_tokens=24,
                       max_obs_tokens=16, max_episode_tokens=200, stop_token_ids=[EOS], stop_strings=["</t>"],
                       temperature=0.0, forced=SCRIPTS, device_stop_strings=device_stops)
    # the transcripts: the scripted model turns with the observations between them
    assert DEC(out.tokens[0]) == "think<t>ab</t>[ab!]so<t>c</t>[c!]5" and out.tokens[0][-1] == EOS
    assert out.tokens[1] == ENC("x") + [EOS]
    assert DEC(out.tokens[2]) == "<t>long call</t>[long call!]<t>submit</t>"
    assert out.end == [END_ANSWER, END_ANSWER, END_SUBMIT]
    assert env.seen == [[0, 1, 2], [0, 2], [0]]  # rows leave the batch at different turns
    obs = ENC("[ab!]")
    assert out.mask[0][:14] == [1] * 14 and out.mask[0][14:14 + len(obs)] == [0] * len(obs)
    assert [t.num_tokens for t in out.turns[0]] == [14, 10, 2]
    # history is never prefilled again: each append is the pending token plus the observation
    appended = (1 + len(ENC("[ab!]"))) + (1 + len(ENC("[c!]"))) + (1 + len(ENC("[long call!]")))
    assert out.stats["append_tokens"] == appended
    assert out.stats["prefill_tokens"] == sum(map(len, PROMPTS)) + appended
    _check_against_oracle(model, PROMPTS, 1, out, greedy=False)


def test_greedy_tokens_after_observations_are_the_oracle_argmax(model):
    """Unforced greedy turns after an observation: each token is the argmax of the from-scratch logits."""
    scripts = [[ENC("<t>q</t>")], [ENC("<t>zz</t>")]]
    out = run_episodes(model, PROMPTS[:2], ScriptedEnv(), decode=DEC, encode=ENC, max_turns=3, max_turn_tokens=12,
                       max_obs_tokens=8, max_episode_tokens=60, stop_token_ids=[EOS], stop_strings=["</t>"],
                       temperature=0.0, forced=scripts)
    for b in range(2):
        want_lp, want_argmax = _oracle(model, PROMPTS[b], out.tokens[b])
        mask = np.asarray(out.mask[b])
        free = np.arange(len(mask)) >= len(scripts[b][0])  # after the forced first turn
        assert (free & (mask == 1)).sum() > 0
        np.testing.assert_array_equal(np.asarray(out.tokens[b])[free & (mask == 1)], want_argmax[free & (mask == 1)])
        np.testing.assert_allclose(np.asarray(out.logprobs[b])[mask == 1], want_lp[mask == 1], atol=1e-5)


def test_sampled_episodes_match_the_oracle_and_respect_budgets(model):
    """Temperature 1, n = 2 per prompt, nothing forced: whatever the model writes, log-probs match and no
    episode passes its budgets."""
    out = run_episodes(model, PROMPTS[:2], ScriptedEnv(), decode=DEC, encode=ENC, n=2, max_turns=3,
                       max_turn_tokens=10, max_obs_tokens=4, max_episode_tokens=25, stop_token_ids=[EOS],
                       stop_strings=["</t>"], temperature=1.0, seed=3,
                       forced=[[ENC("<t>a</t>")], [], [ENC("<t>bc</t>")], [ENC("<t>")]])
    assert out.tokens[0][:8] == ENC("<t>a</t>") and DEC(out.tokens[0][8:]).startswith("[a!]"[:4])
    for b in range(4):
        assert len(out.tokens[b]) <= 25 and len(out.turns[b]) <= 3
        assert all(t.num_tokens <= 10 and t.observation_tokens <= 4 for t in out.turns[b])
        assert out.end[b] in (END_ANSWER, END_LENGTH, END_SUBMIT, END_TURNS)
    _check_against_oracle(model, PROMPTS[:2], 2, out, greedy=False)


def test_turn_budget_ends_with_a_pending_call(model):
    scripts = [[ENC("<t>a</t>"), ENC("<t>b</t>")]]
    out = run_episodes(model, PROMPTS[:1], ScriptedEnv(), decode=DEC, encode=ENC, max_turns=2, max_turn_tokens=16,
                       max_obs_tokens=8, max_episode_tokens=100, stop_token_ids=[EOS], stop_strings=["</t>"],
                       temperature=0.0, forced=scripts)
    assert out.end == [END_TURNS] and DEC(out.tokens[0]) == "<t>a</t>[a!]<t>b</t>"
    _check_against_oracle(model, PROMPTS[:1], 1, out, greedy=False)


def test_budgets_must_be_positive(model):
    with pytest.raises(ValueError, match="max_turns"):
        run_episodes(model, PROMPTS[:1], ScriptedEnv(), decode=DEC, encode=ENC, max_turns=0, max_turn_tokens=4,
                     max_obs_tokens=4, max_episode_tokens=8)


def test_masks_at_truncation_boundaries(model):
    """An observation cut at max_obs_tokens is all mask 0 (its cut end too); a turn cut by the token budget
    (an unclosed `<t>submit` in it) is all mask 1, never shown to the environment, and ends the episode
    with END_LENGTH; the model tokens right after the cut observation are mask 1 with the oracle's
    log-probs."""
    call = ENC("<t>long call</t>")
    cut_turn = ENC("ok <t>submit ... and on and on and on")
    env = ScriptedEnv()
    out = run_episodes(model, PROMPTS[:1], env, decode=DEC, encode=ENC, max_turns=4, max_turn_tokens=20,
                       max_obs_tokens=4, max_episode_tokens=100, stop_token_ids=[EOS], stop_strings=["</t>"],
                       temperature=0.0, forced=[[call, cut_turn]])
    assert out.end == [END_LENGTH] and env.seen == [[0]]  # the cut turn never reached the environment
    assert DEC(out.tokens[0]) == "<t>long call</t>[lon" + DEC(cut_turn[:20])
    assert out.mask[0] == [1] * len(call) + [0] * 4 + [1] * 20
    assert out.turns[0][0].observation_tokens == 4 and out.turns[0][1].call is None
    _check_against_oracle(model, PROMPTS[:1], 1, out, greedy=False)
