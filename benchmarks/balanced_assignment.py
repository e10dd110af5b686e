"""Loss-free balancing beyond MoE (seed 004): the assignment solver against scipy, and a balanced VQ codebook.

(a) `balanced_assignment` on random and shared-preference square problems against scipy's Hungarian solver
    (`linear_sum_assignment`): time, and total cost as a ratio to the optimum (ratios of one run).
(b) A small VQ autoencoder on scikit-learn's `load_digits` (8x8 digits, shipped with scikit-learn): plain VQ (the
    same layer with its bias frozen), balanced VQ (bias moving) and plain VQ with dead-code restart. Dead codes and
    code-usage perplexity on the held-out digits, reconstruction MSE; the code usage is plotted to `--plot`.

Needs the test extra (scipy, scikit-learn, matplotlib):

    python benchmarks/balanced_assignment.py                 # both parts, CPU
    python benchmarks/balanced_assignment.py --part solver --device cuda
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from hf_signopt.assignment import BalancedVectorQuantizer, balanced_assignment


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("solver", "vq", "both"), default="both")
    parser.add_argument("--device", default="cpu", help="device of the solver's cost matrices (scipy runs on CPU)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--vq_steps", type=int, default=3000)
    parser.add_argument("--latents", type=int, default=1, help="quantized vectors per digit")
    parser.add_argument("--vq_rate", type=float, default=3e-3, help="bias step of the balanced VQ")
    parser.add_argument("--restart_every", type=int, default=100, help="dead-code restart period, in steps")
    parser.add_argument("--plot", default="vq_code_usage.png")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def problem(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.rand(n, n, generator=generator)
    scale = torch.rand(n, 1, generator=generator)  # every object ranks the targets alike
    return scale * torch.linspace(0, 1, n) + 0.1 * torch.rand(n, n, generator=generator)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def solver_table(args: argparse.Namespace) -> None:
    from scipy.optimize import linear_sum_assignment

    device = torch.device(args.device)
    print(f"(a) balanced_assignment on {device} vs scipy linear_sum_assignment, float32 costs, one-to-one\n")
    print("| problem | n | scipy s | ours s | ours / scipy time | cost / optimum | sign iteration alone: conflicts |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("random", "shared"):
        for n in args.sizes:
            cost = problem(kind, n, torch.Generator().manual_seed(args.seed + n))
            start = time.perf_counter()
            rows, columns = linear_sum_assignment(cost.double().numpy())
            scipy_seconds = time.perf_counter() - start
            best = float(cost.double().numpy()[rows, columns].sum())
            on_device = cost.to(device)
            balanced_assignment(on_device[:64, :64])  # warm-up (kernels, allocator)
            synchronize(device)
            start = time.perf_counter()
            target = balanced_assignment(on_device)
            synchronize(device)
            seconds = time.perf_counter() - start
            if not torch.equal(target.sort().values.cpu(), torch.arange(n)):
                raise RuntimeError(f"balanced_assignment returned no permutation for {kind} n={n}")
            ratio = float(cost.double()[torch.arange(n), target.cpu()].sum()) / best
            print(f"| {kind} | {n} | {scipy_seconds:.3f} | {seconds:.3f} | {seconds / scipy_seconds:.2f} | "
                  f"{ratio:.5f} | {conflicts_after_sign_iteration(on_device)} |", flush=True)
    print("\nconflicts: objects over capacity after the 100 loss-free iterations, which the auction then repairs\n")


def conflicts_after_sign_iteration(cost: torch.Tensor) -> int:
    from hf_signopt.assignment.solver import _loss_free_iteration

    shifted = cost - cost.min(dim=1, keepdim=True).values
    capacity = torch.ones(cost.shape[1], dtype=torch.int64, device=cost.device)
    choice, _, _ = _loss_free_iteration(shifted, capacity, "sign", float(shifted.max()) / 20, 100)
    return int((torch.bincount(choice, minlength=cost.shape[1]) - capacity).clamp_min(0).sum())


class VQAutoencoder(nn.Module):
    """8x8 digit -> `latents` vectors of `quantizer.dim` -> quantized -> 8x8 digit."""

    def __init__(self, quantizer: BalancedVectorQuantizer, latents: int) -> None:
        super().__init__()
        dim = quantizer.dim
        self.latents, self.quantizer = latents, quantizer
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, latents * dim))
        self.decoder = nn.Sequential(nn.Linear(latents * dim, 256), nn.ReLU(), nn.Linear(256, 64))

    def forward(self, images: torch.Tensor):
        z = self.encoder(images).view(images.shape[0], self.latents, self.quantizer.dim)
        out = self.quantizer(z)
        return self.decoder(out.quantized.flatten(1)), out, z


def train_vq(variant: str, train: torch.Tensor, args: argparse.Namespace) -> VQAutoencoder:
    torch.manual_seed(args.seed)  # the same initialization and batches for every variant
    rate = args.vq_rate if variant == "balanced" else 0.0
    model = VQAutoencoder(BalancedVectorQuantizer(64, 16, update_rate=rate), args.latents)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    used = torch.zeros(64, dtype=torch.bool)
    for step in range(args.vq_steps):
        batch = train[torch.randint(0, train.shape[0], (128,))]
        reconstruction, out, z = model(batch)
        loss = nn.functional.mse_loss(reconstruction, batch) + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # the balanced variant's bias moves here
        used[out.indices.flatten()] = True
        if variant == "restart" and (step + 1) % args.restart_every == 0:
            dead = (~used).nonzero().squeeze(1)  # codes unused for `restart_every` steps: onto random encoder outputs
            with torch.no_grad():
                vectors = z.detach().reshape(-1, 16)
                model.quantizer.codebook[dead] = vectors[torch.randint(0, vectors.shape[0], (dead.numel(),))]
            used.zero_()
    return model


def vq_table(args: argparse.Namespace) -> None:
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().data, dtype=torch.float32) / 16
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
    train, test = images[order[:1500]], images[order[1500:]]
    print(f"(b) VQ autoencoder on load_digits: 64 codes of 16, {args.latents} per digit, {args.vq_steps} Adam steps "
          f"of 128; {train.shape[0]} train / {test.shape[0]} held-out digits\n")
    print("| variant | dead codes (held-out) | usage perplexity (of 64) | reconstruction MSE (held-out) |")
    print("|---|---|---|---|")
    usages = {}
    for variant in ("plain", "balanced", "restart"):
        model = train_vq(variant, train, args).eval()
        with torch.no_grad():
            reconstruction, out, _ = model(test)
        usage = torch.bincount(out.indices.flatten(), minlength=64)
        share = usage / usage.sum()
        perplexity = math.exp(-(share[share > 0] * share[share > 0].log()).sum().item())
        mse = nn.functional.mse_loss(reconstruction, test).item()
        usages[variant] = usage
        name = {"plain": "plain VQ (bias frozen)", "balanced": f"balanced VQ (rate {args.vq_rate:g})",
                "restart": f"plain VQ + dead-code restart every {args.restart_every}"}[variant]
        print(f"| {name} | {int((usage == 0).sum())} | {perplexity:.1f} | {mse:.4f} |", flush=True)
    plot_usage(usages, args.plot)
    print(f"\ncode usage plotted to {args.plot}")


def plot_usage(usages: dict[str, torch.Tensor], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(usages), 1, figsize=(8, 2.2 * len(usages)), sharex=True)
    for axis, (variant, usage) in zip(axes, usages.items()):
        axis.bar(range(usage.numel()), usage.tolist())
        axis.set_ylabel("vectors")
        axis.set_title(f"{variant}: dead codes {int((usage == 0).sum())} of {usage.numel()}", fontsize=10)
    axes[-1].set_xlabel("code (held-out digits)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    if args.part in ("solver", "both"):
        solver_table(args)
    if args.part in ("vq", "both"):
        vq_table(args)


if __name__ == "__main__":
    main()
