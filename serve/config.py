"""``ServeConfig``: every engine option in one dataclass, validated once (the CLI builds it, ``Engine`` takes it)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from lragent.modes import MODES


class ServeError(ValueError):
    """Bad input to the serving engine; the message is one line saying what and how to fix it."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
ATTENTION_BACKENDS = ("auto", "torch", "triton", "reference")


@dataclass
class ServeConfig:
    mode: str | None = None          # a cache mode; None: lrshared when the bundle allows it, else nonshared
    dtype: str = "auto"              # float32 | float16 | bfloat16 | auto (bf16 on CUDA, fp32 on CPU)
    device: str = "auto"             # cpu | cuda[:N] | auto
    block_size: int = 16             # tokens per cache block
    cache_tokens: int = 16384        # cache pool capacity in tokens (rounded up to whole blocks)
    max_batch_tokens: int = 2048     # tokens per engine step (longer prompts are prefilled in chunks; on CPU a
                                     # 512-row chunk runs the fp32 GEMMs ~20% slower per row than 1024-2048)
    max_num_seqs: int = 64           # sequences running at once
    attention: str = "auto"          # auto | torch | triton | reference
    workspace_tokens: int | None = None  # torch backend, low-rank modes: bound on the expanded K' rows held for
                                         # running requests and reuse (None: cache_tokens; 0: none, re-expand)
    seed: int | None = None          # engine RNG for requests without a seed (None: from the OS)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field; raise one ServeError line naming all the problems."""
        bad = []
        if self.mode is not None and self.mode not in MODES:
            bad.append(f"unknown mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.dtype != "auto" and self.dtype not in DTYPES and not isinstance(self.dtype, torch.dtype):
            bad.append(f"dtype {self.dtype!r} is not float32, float16, bfloat16 or auto")
        if self.attention not in ATTENTION_BACKENDS:
            bad.append(f"attention {self.attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        for name in ("block_size", "cache_tokens", "max_batch_tokens", "max_num_seqs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad.append(f"{name} must be a positive integer, got {v!r}")
        w = self.workspace_tokens
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            bad.append(f"workspace_tokens must be a non-negative integer, got {w!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 63):
            bad.append(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        try:
            self.torch_device()
        except (RuntimeError, ServeError) as e:
            bad.append(str(e))
        if bad:
            raise ServeError("; ".join(bad))

    def replace(self, **changes) -> "ServeConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def num_blocks(self) -> int:
        return max(1, math.ceil(self.cache_tokens / self.block_size))

    @property
    def workspace_rows(self) -> int:
        """The workspace bound in tokens (``workspace_tokens``, or the cache capacity when unset)."""
        return self.num_blocks * self.block_size if self.workspace_tokens is None else self.workspace_tokens

    def torch_device(self) -> torch.device:
        """The device to serve on (auto: CUDA when available)."""
        if self.device in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ServeError(f"device {self.device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
        if dev.type not in ("cpu", "cuda"):
            raise ServeError(f"device {self.device!r} is not supported: use cpu, cuda, cuda:N or auto")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ServeError(f"device {self.device!r} asked for but CUDA is not available here: use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ServeError(f"device {self.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return dev

    def torch_dtype(self) -> torch.dtype:
        """The activation and cache dtype (auto: bfloat16 on CUDA, float32 on CPU)."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]
