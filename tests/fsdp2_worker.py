"""Worker for test_optim_fsdp2.py: trains a float64 MLP with each sign optimizer, alone or FSDP2-sharded.

Usage: `python fsdp2_worker.py OUT_DIR` (one process over the global batch) or under `torchrun --nproc_per_node 2`
(`fully_shard` on every layer and the root over a 2-rank gloo CPU mesh, each rank on its half of the batch). Each
run writes `OUT_DIR/rank{r}.pt`: per (optimizer, path, dtype), the full parameters after training, how many
parameters were DTensors, and the step implementations `select_impl` chose.
"""

import os
import sys

import torch
import torch.distributed as dist

from hf_signopt import Lion, Signum, Simba
from hf_signopt.optim import _functional

OPTIMIZERS = {
    "lion": lambda ps, **k: Lion(ps, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, **k),
    "signum": lambda ps, **k: Signum(ps, lr=1e-2, momentum=0.8, weight_decay=0.1, **k),
    "simba": lambda ps, **k: Simba(ps, lr=1e-2, window_size=4, threshold=0.3, weight_decay=0.1, **k),
}
PATHS = {"default": {}, "foreach": {"foreach": True}}
DTYPES = {"float64": torch.float64, "float32": torch.float32}  # float32: the default path is the fused C++ kernel
GLOBAL_BATCH, STEPS = 8, 5
CHOSEN: set[str] = set()


def recording_select_impl(*args, select_impl=_functional.select_impl):
    impl = select_impl(*args)
    CHOSEN.add(impl)
    return impl


_functional.select_impl = recording_select_impl


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    # 7 and 3 output rows do not split evenly over 2 ranks: padded shards, and an empty one for the (1,) bias.
    layers = [torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)]
    return torch.nn.Sequential(*layers).to(dtype)


def train(name: str, path: dict, dtype: torch.dtype, rank: int, world_size: int) -> dict:
    model = make_model(dtype)
    if world_size > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    optimizer = OPTIMIZERS[name](model.parameters(), **path)
    CHOSEN.clear()
    gen = torch.Generator().manual_seed(1)
    rows = GLOBAL_BATCH // world_size
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=dtype)
        y = x[:, :1].sin()
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        loss = (model(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    dtensors = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    full = {k: (v.full_tensor() if type(v).__name__ == "DTensor" else v).detach().clone()
            for k, v in model.named_parameters()}
    return {"params": full, "dtensors": dtensors, "impls": sorted(CHOSEN)}


def main(out_dir: str) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world_size > 1:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    results = {}
    for name in OPTIMIZERS:
        for path_name, path in PATHS.items():
            for dtype_name, dtype in DTYPES.items():
                results[name, path_name, dtype_name] = train(name, path, dtype, rank, world_size)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    if world_size > 1:  # every collective above is synchronous; leave together, then free gloo's threads
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
