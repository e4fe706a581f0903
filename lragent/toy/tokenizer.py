"""A small word-level tokenizer built locally (no download), saved as a standard HF fast tokenizer.

The vocabulary covers the toy agent task (see ``lragent.toy.task``): turn tags, role names, keys, values and a few
words. Text is split on whitespace; anything outside the vocabulary maps to ``<unk>``.
"""
from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
ROLE_WORDS = ["system", "user", "tool", "assistant", "planner", "actor", "reflector"]
TASK_WORDS = [
    ":", "=", ";", ",", ".", "?", "->", "find", "the", "value", "of", "lookup", "answer", "ok", "retry",
    "is", "key", "result", "correct", "wrong", "db", "query", "not", "found", "yes", "no", "done", "step",
]
N_KEYS = 64
N_VALUES = 100
MODEL_MAX_LENGTH = 512

# A chat template in the HF jinja format: one turn per message, "<role> : <content> </s>", tokens separated by single
# spaces and no trailing space, so that rendered text is canonical: ``decode(encode(text)) == text``.
# ``add_generation_prompt`` with a ``role`` variable appends " <role> :" (the model then emits " <content> </s>").
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %} {{ m['role'] }} : {{ m['content'] }} {{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt and role is defined %} {{ role }} :{% endif %}"
)


def vocabulary() -> list[str]:
    words = SPECIAL_TOKENS + ROLE_WORDS + TASK_WORDS
    words += [f"k{i}" for i in range(N_KEYS)]
    words += [str(i) for i in range(N_VALUES)]
    seen: set[str] = set()
    out = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_tokenizer():
    """Return a ``transformers.PreTrainedTokenizerFast`` over :func:`vocabulary`, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=MODEL_MAX_LENGTH,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(out_dir: str | Path):
    """Save as a standard HF fast tokenizer. ``tokenizer_config.json`` also names the generic class and carries the
    chat template inline, so that readers other than the installed transformers version load it too."""
    import json

    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return tok
