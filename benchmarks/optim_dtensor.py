"""Host overhead of an optimizer step on DTensor parameters (what `fully_shard` gives) against plain tensors.

Many small tensors make the step's per-tensor host work visible (torch issue 134191 reports foreach optimizers
CPU-bound on DTensors, each op going through DTensor dispatch). The sign optimizers step the local shards, so
their DTensor step should cost about what the plain one does. One process, a 1-rank gloo mesh, CPU tensors; the
steps are timed in rounds (one step of each optimizer per round) and the median is printed.

    python benchmarks/optim_dtensor.py                      # 2000 tensors of 256 float32 elements
    python benchmarks/optim_dtensor.py --tensors 500 --numel 4096
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from hf_signopt import Lion, Simba

CANDIDATES: dict[str, Callable] = {
    "Lion (default)": lambda ps: Lion(ps, lr=1e-4, weight_decay=0.1),
    "Lion (foreach)": lambda ps: Lion(ps, lr=1e-4, weight_decay=0.1, foreach=True),
    "Simba (default)": lambda ps: Simba(ps, lr=1e-4, weight_decay=0.1),
    "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, foreach=True),
}


def parameters(tensors: int, numel: int, mesh=None) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(tensors):
        data, grad = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen)
        if mesh is not None:
            data, grad = distribute_tensor(data, mesh, [Shard(0)]), distribute_tensor(grad, mesh, [Shard(0)])
        param = torch.nn.Parameter(data)
        param.grad = grad
        params.append(param)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--numel", type=int, default=256, help="elements per tensor")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (median reported)")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))

    runs = {}
    for name, factory in CANDIDATES.items():
        for kind, params in (("plain", parameters(args.tensors, args.numel)),
                             ("DTensor", parameters(args.tensors, args.numel, mesh))):
            optimizer = factory(params)
            optimizer.step()  # state created, kernels loaded
            runs[name, kind] = optimizer
    times = {key: [] for key in runs}
    for _ in range(args.steps):
        for key, optimizer in runs.items():
            start = time.perf_counter()
            optimizer.step()
            times[key].append(time.perf_counter() - start)

    print(f"{args.tensors} tensors of {args.numel} float32 elements, {torch.get_num_threads()} thread(s), "
          f"median of {args.steps} rounds")
    header = f"{'optimizer':24s} {'plain ms':>9s} {'DTensor ms':>11s} {'DTensor / plain':>16s}"
    print(header)
    print("-" * len(header))
    for name in CANDIDATES:
        plain, sharded = (statistics.median(times[name, kind]) for kind in ("plain", "DTensor"))
        print(f"{name:24s} {plain * 1e3:9.2f} {sharded * 1e3:11.2f} {sharded / plain:15.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
