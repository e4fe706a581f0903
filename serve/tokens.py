"""Tokenizer loading and chat rendering for the engine (one-line errors for a missing tokenizer or template)."""
from __future__ import annotations

from pathlib import Path

from .config import ServeError


class NoChatTemplate(ServeError):
    """The base model's tokenizer has no chat template: send text prompts instead (/v1/completions, --raw)."""


def load_tokenizer(model_dir: str | Path):
    """The HF tokenizer of a local model directory, or a one-line error when it has none."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    model_dir = Path(model_dir)
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                                   "vocab.json")):
        raise ServeError(f"base model {model_dir} has no tokenizer files (tokenizer.json / tokenizer_config.json): "
                         f"copy the tokenizer next to the weights")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ServeError(f"cannot load the tokenizer of {model_dir}: {str(e).splitlines()[0][:160]}") from None


def render_chat(tokenizer, messages: list[dict], role: str) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template with ``add_generation_prompt`` for ``role``."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("the base model's tokenizer has no chat template: send a text prompt instead "
                             "(/v1/completions, or --raw with lragent generate)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m.get("role"):
            raise ServeError(f"message {i} has no 'role' string")
        if not isinstance(m.get("content"), str):
            raise ServeError(f"message {i} ({m.get('role')}) has no 'content' string")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, role=role)
    except Exception as e:                           # jinja errors of a user's template: one line
        raise ServeError(f"the tokenizer's chat template failed on this transcript: "
                         f"{str(e).splitlines()[0][:160]}") from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)
