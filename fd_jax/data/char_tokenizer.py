"""A real Hugging Face tokenizer, built offline: one token per character over a small fixed alphabet.

Tests and the smoke configuration need a tokenizer that behaves exactly like a downloaded one
(`encode`, `decode`, `apply_chat_template`, `save_pretrained`, `AutoTokenizer.from_pretrained`) but nothing
can be downloaded, so this one is assembled from the `tokenizers` library. Characters outside the alphabet
map to `<unk>`.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3, in this order
# A handful of Lean symbols so that Lean-looking text round-trips in tests.
LEAN_SYMBOLS = "ℕℤℝ≤≥≠→↔∀∃¬∧∨⊢×·"
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n" + LEAN_SYMBOLS

# Renders `role: content` lines; an assistant turn ends with <eos> so that a model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer: vocabulary `SPECIAL_TOKENS + ALPHABET` (116 tokens, ids are stable).

    `encode(text)` prepends `<bos>` (use `add_special_tokens=False` for continuations); `decode` joins the
    characters back without separators. Save it with `save_pretrained(dir)`; `AutoTokenizer.from_pretrained
    (dir)` gives it back.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
    assert len(vocab) == len(SPECIAL_TOKENS) + len(ALPHABET), "ALPHABET has a repeated character"
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # `[\s\S]` rather than `.`: the newline must be a token of its own too.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
