"""Flash-LoRA-Attention kernels (Triton) and their torch references.

    O = softmax(Q (K_base + RoPE(L_k B_k))^T * scale, causal bottom-right) (V_base + L_v B_v)

`flash_lora_attention` / `flash_lora_attention_paged` run the Triton kernels (CUDA tensors, or any device under
``TRITON_INTERPRET=1``); `flash_lora_attention_ref` / `flash_lora_attention_paged_ref` are the pure-torch
references with the same signatures (the test oracle); `flash_lora_attention_paged_cpu` is the torch fast path
with the paged signature (the engine's CPU path). `triton_unsupported(head_dim, rank, key_lora)` says which shapes
the kernels cannot run. Triton is imported on the first kernel
call, so ``import lragent.kernels`` works without a GPU or without Triton.
"""
import functools
import importlib.util
import inspect

from .cpu import flash_lora_attention_paged_cpu
from .limits import triton_unsupported
from .reference import flash_lora_attention_paged_ref, flash_lora_attention_ref

__all__ = ["flash_lora_attention", "flash_lora_attention_paged", "flash_lora_attention_ref",
           "flash_lora_attention_paged_ref", "flash_lora_attention_paged_cpu", "triton_available",
           "triton_unsupported"]


def triton_available():
    """True when Triton imports (kernels runnable on CUDA tensors, or anywhere with TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def _lazy(name):
    def load():
        try:
            from . import flash_lora
        except ImportError as exc:
            raise ImportError(f"{name} needs Triton ({exc}); without it use {name}_ref") from exc
        return getattr(flash_lora, name)

    def wrapper(*args, **kwargs):
        return load()(*args, **kwargs)

    ref = {"flash_lora_attention": flash_lora_attention_ref,
           "flash_lora_attention_paged": flash_lora_attention_paged_ref}[name]
    functools.update_wrapper(wrapper, ref)
    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = (f"Triton kernel (imported on first call); see lragent.kernels.flash_lora.{name}. "
                       f"Same signature as the reference:\n\n{ref.__doc__ or ''}")
    del wrapper.__wrapped__
    wrapper.__signature__ = inspect.signature(ref)
    return wrapper


flash_lora_attention = _lazy("flash_lora_attention")
flash_lora_attention_paged = _lazy("flash_lora_attention_paged")
