"""Refuse a cache pool larger than the memory that is free now (one line, before allocating anything)."""
from __future__ import annotations

import torch

from .config import ServeError


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now (CUDA: free device memory; CPU: MemAvailable), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cache_bytes(cfg, num_blocks: int, block_size: int, num_lr_blocks: int, lr_width: int, dtype) -> int:
    """Bytes of the paged pool: K and V blocks of every layer, plus the low-rank blocks."""
    elem = torch.empty(0, dtype=dtype).element_size()
    kv = 2 * cfg.num_layers * num_blocks * block_size * cfg.d_kv
    lr = cfg.num_layers * num_lr_blocks * block_size * lr_width
    return (kv + lr) * elem


def check_cache_fits(cfg, num_blocks, block_size, num_lr_blocks, lr_width, dtype, device, fraction=0.9) -> None:
    need = cache_bytes(cfg, num_blocks, block_size, num_lr_blocks, lr_width, dtype)
    free = available_bytes(device)
    if free is not None and need > fraction * free:
        raise ServeError(f"the cache pool needs {need / 2 ** 30:.2f} GiB ({num_blocks * block_size} tokens) but only "
                         f"{free / 2 ** 30:.2f} GiB of {device.type} memory is free: lower --cache-tokens")
