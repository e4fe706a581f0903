"""Run under ``torchrun --nproc_per_node 2`` (gloo): train, then compare every adapter tensor across ranks."""
import sys

import torch
import torch.distributed as dist

from lragent.train.config import load_config
from lragent.train.lora import lora_state
from lragent.train.trainer import train

base, out = sys.argv[1], sys.argv[2]
cfg = load_config(None, [f"model.base={base}", f"output_dir={out}", "data.embedded_train_size=32",
                         "data.eval=null", "train.batch_size=2", "train.max_steps=4", "lora.rank=4",
                         "train.log_every=1"])
res = train(cfg)
assert dist.is_initialized() and dist.get_world_size() == 2, "expected a 2-process gloo group"
state = lora_state(res.model, res.roles)
shared = [k for k in state if k.endswith("k_proj.lora_A") or k.endswith("v_proj.lora_A")]
assert shared
for name in sorted(state):
    t = state[name].contiguous()
    gathered = [torch.empty_like(t) for _ in range(2)]
    dist.all_gather(gathered, t)
    assert torch.equal(gathered[0], gathered[1]), f"{name} differs across ranks"
    if name in shared:
        assert t.abs().sum() > 0
if dist.get_rank() == 0:
    print(f"shared A identical across 2 ranks ({len(shared)} shared A tensors, {len(state)} adapter tensors)")
