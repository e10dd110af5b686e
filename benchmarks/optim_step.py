"""Time one optimizer step on a fixed parameter set and compare it with its memory-traffic bound.

All optimizers update the same parameters (32M float32 in 64 tensors by default, weight decay on,
the gradients fixed): each of ours on every implementation path, torch AdamW foreach and fused, and
the peer Lion implementations that are importable (lion-pytorch, torch-optimi, pytorch-optimizer;
missing ones are skipped). After warm-up, the steps are timed in rounds, one step of each optimizer
per round, so that a noisy shared machine slows all of them alike; the median is reported.

Each round also times ``Tensor.copy_`` over as many bytes as the parameters; the copy bandwidth
counts read + write. An optimizer's lower bound is the bytes it must move per parameter (read
p, g and state, write p and state: 12 + 2 x state bytes for float32 parameters) over that
bandwidth. A plain copy also pays for write-allocating its destination, which an in-place update
does not, so a fused in-place step can come in under 1.0x.

    python benchmarks/optim_step.py                      # 32M parameters, torch's thread count
    python benchmarks/optim_step.py --threads 1 --steps 5
    python benchmarks/optim_step.py --numel 4194304 --only lion,adamw
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hf_signopt import Lion, SignMomentum, Signum, Simba

HYPER = dict(lr=1e-4, weight_decay=0.1)


def candidates() -> dict[str, Callable]:
    """name -> factory(params): ours on each path, torch AdamW, importable peer Lions."""
    ours = {
        "Lion": lambda ps, **k: Lion(ps, **HYPER, **k),
        "Signum": lambda ps, **k: Signum(ps, **HYPER, **k),
        "signSGD": lambda ps, **k: Signum(ps, momentum=0.0, **HYPER, **k),
        "SignMomentum": lambda ps, **k: SignMomentum(ps, **HYPER, **k),
        "Simba w=127": lambda ps, **k: Simba(ps, window_size=127, **HYPER, **k),
        "Simba w=128": lambda ps, **k: Simba(ps, window_size=128, **HYPER, **k),
        "Simba ema": lambda ps, **k: Simba(ps, window_size=127, momentum="ema", **HYPER, **k),
    }
    out = {}
    for name, factory in ours.items():
        out[f"{name} (fused)"] = lambda ps, f=factory: f(ps, fused=True)
        out[f"{name} (foreach)"] = lambda ps, f=factory: f(ps, foreach=True)
    out["torch AdamW (foreach)"] = lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True)
    out["torch AdamW (fused)"] = lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)
    try:
        import lion_pytorch

        out["lion-pytorch Lion"] = lambda ps: lion_pytorch.Lion(ps, **HYPER)
    except ImportError:
        pass
    try:
        import optimi

        out["torch-optimi Lion (foreach)"] = lambda ps: optimi.Lion(ps, **HYPER, decouple_lr=False, foreach=True)
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        out["pytorch-optimizer Lion (foreach)"] = lambda ps: pytorch_optimizer.Lion(ps, **HYPER, foreach=True)
    except ImportError:
        pass
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def state_bytes_per_param(optimizer: torch.optim.Optimizer, numel: int) -> float:
    """Bytes of per-element optimizer state (scalars such as AdamW's step excluded)."""
    total = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total / numel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=32 * 2**20, help="total float32 parameters")
    parser.add_argument("--tensors", type=int, default=64, help="number of parameter tensors")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--only", default="", help="comma-separated substrings of the names to run")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    factories = {n: f for n, f in candidates().items() if not wanted or any(w in n.lower() for w in wanted)}

    gen = torch.Generator().manual_seed(0)
    size = args.numel // args.tensors
    params = [torch.nn.Parameter(torch.randn(size, generator=gen)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn(size, generator=gen)
    numel = size * args.tensors
    src, dst = torch.rand(numel), torch.empty(numel)

    optimizers = {name: factory(params) for name, factory in factories.items()}
    for optimizer in optimizers.values():
        for _ in range(args.warmup):
            optimizer.step()
    copy_times, step_times = [], {name: [] for name in optimizers}
    for _ in range(args.steps):
        copy_times.append(timed(lambda: dst.copy_(src)))
        for name, optimizer in optimizers.items():
            step_times[name].append(timed(optimizer.step))
    bandwidth = 2 * 4 * numel / statistics.median(copy_times)

    print(f"{numel / 2**20:.0f}M float32 parameters in {args.tensors} tensors, weight decay on, "
          f"{torch.get_num_threads()} thread(s), median of {args.steps} rounds after {args.warmup} warm-up steps")
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
    adamw = statistics.median(step_times["torch AdamW (fused)"]) if "torch AdamW (fused)" in step_times else None
    header = (f"{'optimizer':34s} {'ms/step':>8s} {'B/param':>8s} {'bound ms':>9s} {'x bound':>8s} "
              f"{'state B/param':>13s} {'AdamW fused / this':>18s}")
    print(header)
    print("-" * len(header))
    for name, optimizer in optimizers.items():
        seconds = statistics.median(step_times[name])
        state = state_bytes_per_param(optimizer, numel)
        traffic = 12 + 2 * state
        bound = traffic * numel / bandwidth
        speed = f"{adamw / seconds:17.2f}x" if adamw else f"{'-':>18s}"
        print(f"{name:34s} {seconds * 1e3:8.1f} {traffic:8.0f} {bound * 1e3:9.1f} {seconds / bound:8.2f} "
              f"{state:13.0f} {speed}")


if __name__ == "__main__":
    main()
