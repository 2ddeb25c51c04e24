"""The public contracts that benchmarks, scripts and users call (docs/architecture.md, "Public entry
points") stay importable at these exact paths, whatever module now holds the code."""

import importlib
import inspect

import pytest

CONTRACTS = {
    "fd_jax.models": ["load_hf", "save_hf"],
    "fd_jax.sampling": ["generate", "SampleOutput"],
    "fd_jax.kernels.token_kl": ["reference_divergence", "fused_divergence"],
    "fd_jax.losses": ["group_advantages", "policy_loss"],
    "fd_jax.lean": ["ProofTask", "Verdict", "screen", "parse_repl_output", "classify", "LeanVerifier"],
    "fd_jax.feedback": ["FeedbackRequest", "get_provider"],
    "fd_jax.evaluation": ["pass_at_k"],
    "fd_jax.train_batch": ["pack_train_batch", "TrainBatch"],
    "fd_jax.train_step": ["StepConfig", "init_train_state", "make_train_step", "BATCH_FIELDS"],
}


@pytest.mark.parametrize("module,name", [(m, n) for m, names in CONTRACTS.items() for n in names])
def test_public_name_is_importable(module, name):
    obj = getattr(importlib.import_module(module), name)
    assert obj is not None and (callable(obj) or isinstance(obj, tuple)), f"{module}.{name} is {obj!r}"


def test_contract_signatures_keep_their_keywords():
    from fd_jax.kernels.token_kl import fused_divergence, reference_divergence
    from fd_jax.losses import group_advantages, policy_loss
    from fd_jax.sampling import generate
    from fd_jax.train_batch import pack_train_batch

    def keywords(fn):
        return set(inspect.signature(fn).parameters)

    assert {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "seed"} <= keywords(generate)
    for fn in (reference_divergence, fused_divergence):
        assert {"alpha", "mode", "top_k", "add_tail", "sampled_ids"} <= keywords(fn)
    assert {"scale", "eps"} <= keywords(group_advantages)
    assert {"loss_type", "eps_low", "eps_high", "importance_sampling_level", "max_completion_length"} <= keywords(
        policy_loss)
    assert {"student_prompts", "teacher_prompts", "completions", "old_logprobs", "rewards_B", "advantages_B",
            "distill_mask_B", "pad_id", "pad_multiple"} <= keywords(pack_train_batch)


def test_batch_fields_name_train_batch_fields():
    import dataclasses

    from fd_jax.train_batch import TrainBatch
    from fd_jax.train_step import BATCH_FIELDS

    assert set(BATCH_FIELDS) <= {f.name for f in dataclasses.fields(TrainBatch)}
