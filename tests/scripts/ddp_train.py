"""Run under ``torchrun --nproc_per_node 2`` (gloo): train, then compare every adapter tensor across ranks."""
import os
import sys

import torch
import torch.distributed as dist

from lragent.train.config import load_config
from lragent.train.lora import lora_state
from lragent.train.trainer import batch_indices, train as train_lib
from lragent.cli.embedded import EMBEDDED


def train(cfg, **kw):
    """The trainer with the embedded default resolved, as the command line does."""
    return train_lib(cfg, embedded=EMBEDDED, **kw)

base, out = sys.argv[1], sys.argv[2]
cfg = load_config(None, [f"model.base={base}", f"output_dir={out}", "data.embedded_train_size=32",
                         "data.eval=null", "train.batch_size=2", "train.max_steps=4", "lora.rank=4",
                         "train.log_every=1"])
res = train(cfg)
assert res.num_processes == 2 and dist.get_world_size() == 2, f"trained in {res.num_processes} process(es), not 2"
assert dist.get_backend() == "gloo"
state = lora_state(res.model, res.roles)
shared = [k for k in state if k.endswith("k_proj.lora_A") or k.endswith("v_proj.lora_A")]
assert shared
trained_b = 0
for name in sorted(state):
    t = state[name].contiguous()
    gathered = [torch.empty_like(t) for _ in range(2)]
    dist.all_gather(gathered, t)
    assert torch.equal(gathered[0], gathered[1]), f"{name} differs across ranks"
    if ".lora_B." in name:     # B starts at zero (A does not): a non-zero B is one that training moved
        trained_b += int(t.abs().sum() > 0)
assert trained_b == sum(".lora_B." in k for k in state), f"only {trained_b} B tensors moved from zero"
# The ranks read different rows (the trainer's sharding), so identical adapters mean gradients were averaged.
rows = torch.tensor(batch_indices(list(range(96)), 0, 2, 2, dist.get_rank(), 0))
all_rows = [torch.empty_like(rows) for _ in range(2)]
dist.all_gather(all_rows, rows)
assert not set(all_rows[0].tolist()) & set(all_rows[1].tolist()), all_rows
if dist.get_rank() == 0:
    print(f"shared A identical across 2 ranks ({len(shared)} shared A tensors, {len(state)} adapter tensors)")
dist.barrier()                 # neither rank tears its pairs down while the other still has work in flight
dist.destroy_process_group()
# What this script checks is done. Skip interpreter finalisation: CI once saw rank 1 abort there ("terminate called
# without an active exception", a C++ thread of torch's still joinable at exit) after every check above had passed.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
