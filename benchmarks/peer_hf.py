"""HF transformers + PEFT as a peer system for the multi-role trajectory benchmark.

    system = HFPeftSystem(base_dir, {"planner": "peft/planner", "actor": "peft/actor"}, reuse=True)
    r = system.run_turn(prompt_ids, "planner", max_new_tokens=32)   # -> TurnResult
    system.cache_bytes(); system.reset(); system.close()

Written the way a user would: one ``PeftModel`` holding every role's adapter (``PeftModel.from_pretrained`` for
the first, ``load_adapter`` for the rest), ``set_adapter(role)`` per turn, greedy decoding with an explicit
``DynamicCache`` (exactly ``max_new_tokens`` tokens, EOS ignored), sdpa attention, ``torch.inference_mode``.

- ``reuse=True`` (the peer's best case): each role keeps its own cache of its previous prompt+output. A turn keeps
  the longest common prefix of the cached ids and the new prompt (cropping the rest), prefills only the remainder
  in one forward, then decodes. After N greedy tokens the cache covers prompt + output[:-1]: the last token's KV
  is never written, since it is never fed.
- ``reuse=False``: every turn prefills the whole prompt into a fresh cache, which is dropped after the turn.

API differences handled across transformers versions: the cache keyword (``cache`` in 5.x, ``past_key_values``
before), ``logits_to_keep`` vs ``num_logits_to_keep``, ``dtype`` vs ``torch_dtype`` at load time, and the cache's
tensors (``cache.layers[i].keys`` vs ``cache.key_cache[i]``). ``DynamicCache.crop`` is only called with a negative
count (tokens to remove), the one form every version accepts.
"""
from __future__ import annotations

import gc
import inspect
import time

import torch
import transformers
from packaging.version import Version
from peft import PeftModel
from transformers import AutoModelForCausalLM, DynamicCache

from systems import TurnResult


def kv_tensors(cache) -> list[torch.Tensor]:
    """Every key and value tensor a ``DynamicCache`` holds now (new ``layers`` API or old ``key_cache`` lists)."""
    if hasattr(cache, "layers"):
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    else:
        pairs = list(zip(cache.key_cache, cache.value_cache))
    return [t for pair in pairs for t in pair if isinstance(t, torch.Tensor)]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class HFPeftSystem:
    """HF transformers + PEFT, written the way a user would: one PeftModel with every role's adapter loaded
    (PeftModel.from_pretrained for the first, load_adapter for the others), set_adapter(role) per turn."""

    def __init__(self, base_dir, adapters: dict[str, str], *, reuse: bool, dtype=torch.float32, device="cpu"):
        """Loads the base model (sdpa, ``dtype``) and every adapter in ``adapters`` (role -> PEFT directory)."""
        if not adapters:
            raise ValueError("at least one adapter is needed")
        dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), attn_implementation="sdpa", **{dtype_kw: dtype})
        roles = list(adapters)
        model = PeftModel.from_pretrained(base, str(adapters[roles[0]]), adapter_name=roles[0])
        for role in roles[1:]:
            model.load_adapter(str(adapters[role]), adapter_name=role)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.reuse = reuse
        self.name = "hf-peft (reuse)" if reuse else "hf-peft (no reuse)"
        params = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep"
        self._caches: dict[str, tuple[DynamicCache, list[int]]] = {}   # role -> (cache, token ids it covers)

    def _next_token(self, ids: list[int], cache: DynamicCache) -> int:
        """Runs ``ids`` through the model on top of ``cache`` and returns the argmax of the last position."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, use_cache=True, **{self._cache_kw: cache, self._keep_kw: 1})
        return int(out.logits[0, -1].argmax())

    def _cache_for(self, role: str, prompt: list[int]) -> tuple[DynamicCache, int]:
        """The cache to start this turn from and how many prompt tokens it already covers (at most len-1)."""
        if not self.reuse or role not in self._caches:
            return DynamicCache(), 0
        cache, covered = self._caches[role]
        keep = min(common_prefix(covered, prompt), len(prompt) - 1)  # the last prompt token must be fed
        if keep == 0:
            return DynamicCache(), 0
        if len(covered) > keep:
            cache.crop(keep - len(covered))
        return cache, keep

    def run_turn(self, prompt_ids: list[int], role: str, max_new_tokens: int) -> TurnResult:
        """Greedily generates exactly ``max_new_tokens`` tokens for ``prompt_ids`` with ``role``'s adapter."""
        if max_new_tokens < 1 or not prompt_ids:
            raise ValueError("need a non-empty prompt and max_new_tokens >= 1")
        prompt = [int(t) for t in prompt_ids]
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.set_adapter(role)
            cache, reused = self._cache_for(role, prompt)
            out = [self._next_token(prompt[reused:], cache)]
            ttft = time.perf_counter() - t0
            while len(out) < max_new_tokens:
                out.append(self._next_token(out[-1:], cache))
        total = time.perf_counter() - t0
        if self.reuse:
            self._caches[role] = (cache, prompt + out[:-1])   # the last token's KV was never written
        return TurnResult(out, ttft, total, len(prompt) - reused, reused)

    def cache_bytes(self) -> int:
        """Bytes of the K/V tensors held now across every role's cache (always 0 without reuse)."""
        return sum(t.numel() * t.element_size() for cache, _ in self._caches.values() for t in kv_tensors(cache))

    def reset(self) -> None:
        """Drops every role's cache (the start of a new trajectory)."""
        self._caches.clear()

    def close(self) -> None:
        """Frees the caches and the model."""
        self.reset()
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
