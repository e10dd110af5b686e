"""Loss-free load balancing vs an auxiliary loss vs nothing, on a tiny MoE trained on Tiny Shakespeare.

Trains the same tiny `LossFreeMoeForCausalLM` (8 experts, top-2, byte tokens) three ways from the same initial
weights on the same batches:

- `none`: no balancing (the bias stays 0: this is Mixtral);
- `aux loss`: Mixtral's auxiliary load-balancing loss (coefficient `--aux-coef`, 0.02 as in Mixtral-8x7B's
  config);
- `loss-free`: the router bias updated once per optimizer step by `LossFreeBalanceCallback`.

It prints, on held-out text, the eval loss and MaxVio_global per layer ((max expert load - mean) / mean over
the whole held-out set). Then it measures the training throughput of `LossFreeMoeForCausalLM` plus the
callback's per-step work against `MixtralForCausalLM` holding the same weights, in interleaved rounds.
The training loop is a plain PyTorch loop calling the callback's `on_step_end` after each optimizer step (what
the Trainer does), so that Trainer overhead, the same for both models, does not dilute the ratio.
The throughput is measured with the callback's rate at 0 (routing identical to Mixtral's: the
implementation's cost) and at `--update-rate` (the bias moves, so the expert load differs too), for each
`--experts-implementation` given (both models always run the same one; default: the one transformers picks).

    python benchmarks/moe_balance.py                                 # about 5 minutes on 2 CPU cores
    python benchmarks/moe_balance.py --steps 300 --update-rate 0.01  # about 2 minutes
    python benchmarks/moe_balance.py --skip-quality --experts-implementation eager batched_mm grouped_mm

The paper's rate u=0.001 needs enough steps for the bias to cross the score gaps between experts: on this
tiny model 300 steps are not enough (loss-free MaxVio about 0.9x the aux loss's), 1000 are; a shorter run
needs a larger rate.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM, TrainerControl, TrainerState, TrainingArguments

from hf_signopt import LossFreeBalanceCallback, LossFreeBalancer, LossFreeMoeConfig, LossFreeMoeForCausalLM

CORPUS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "tinyshakespeare.txt"
# transformers' experts kernels that run on CPU: a loop over the experts that received tokens, one batched
# matmul over every (token, chosen expert) pair, and torch's grouped matmul over tokens sorted by expert.
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per training run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux-coef", type=float, default=0.02, help="aux-loss coefficient of the baseline")
    parser.add_argument("--update-rate", type=float, default=0.001, help="bias update rate u of the loss-free run")
    parser.add_argument("--update-rule", default="sign", choices=["sign", "rms", "linear"])
    parser.add_argument("--eval-windows", type=int, default=128, help="held-out windows of --seq-len bytes")
    parser.add_argument("--throughput-steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--throughput-rounds", type=int, default=20, help="interleaved timed blocks per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--experts-implementation", nargs="+", choices=EXPERTS_IMPLEMENTATIONS, default=None,
        help="experts kernels to time, each for both models (default: transformers' choice for this machine)",
    )
    parser.add_argument("--skip-quality", action="store_true", help="only measure the training throughput")
    args = parser.parse_args()
    for name in ("steps", "batch_size", "seq_len", "eval_windows", "throughput_steps", "throughput_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def mixtral_sizes(args: argparse.Namespace) -> dict:
    return dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=args.seq_len,
    )


def model_config(args: argparse.Namespace, **overrides) -> LossFreeMoeConfig:
    fields = dict(router_bias_update_rate=args.update_rate, router_bias_update_rule=args.update_rule)
    fields.update(overrides)
    return LossFreeMoeConfig(**mixtral_sizes(args), **fields)


def load_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.frombuffer(bytearray(CORPUS.read_bytes()), dtype=torch.uint8).long()
    split = int(0.9 * data.numel())
    return data[:split], data[split:]


def batches(train: torch.Tensor, args: argparse.Namespace, steps: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train.numel() - args.seq_len, (steps, args.batch_size), generator=generator)
    offsets = torch.arange(args.seq_len)
    return [train[s[:, None] + offsets] for s in starts]


def learning_rate(step: int, args: argparse.Namespace) -> float:
    warmup = max(1, args.steps // 10)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class CallbackDriver:
    """Calls a TrainerCallback's events the way Trainer does, for a plain training loop."""

    def __init__(self, callback: LossFreeBalanceCallback, model: torch.nn.Module, output_dir: str):
        self.callback = callback
        self.args = TrainingArguments(output_dir=output_dir, report_to=[], use_cpu=True)
        self.state, self.control = TrainerState(), TrainerControl()
        callback.on_train_begin(self.args, self.state, self.control, model=model)

    def step_end(self) -> None:
        self.state.global_step += 1
        self.callback.on_step_end(self.args, self.state, self.control)


def train(model, data: list[torch.Tensor], args: argparse.Namespace, driver: CallbackDriver | None) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(data):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if driver is not None:
            driver.step_end()
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model, held_out: torch.Tensor, args: argparse.Namespace) -> tuple[float, list[float]]:
    """Eval loss and MaxVio_global per layer over `--eval-windows` consecutive held-out windows."""
    windows = held_out[: args.eval_windows * args.seq_len].reshape(-1, args.seq_len)
    meter = LossFreeBalancer(model, count_eval_tokens=True)  # counts eval tokens only; never steps the bias
    model.eval()
    losses = [model(input_ids=w, labels=w, output_router_logits=False).loss for w in windows.split(args.batch_size)]
    meter.remove()
    metrics = meter.eval_metrics()
    return torch.stack(losses).mean().item(), metrics.maxvio.tolist()


def throughput_ratio(
    args: argparse.Namespace,
    data: list[torch.Tensor],
    output_dir: str,
    update_rate: float,
    experts_implementation: str | None,
) -> tuple[list[float], float, float, str]:
    """Throughput ratios time(Mixtral) / time(LossFree + callback), one per round, for the same steps and initial
    weights; the fastest block's tokens/s of each model; and the experts implementation both ran.

    Each round times one block of steps of each model back to back (which goes first alternates), so both see
    about the same load from other processes; the per-round ratios' quartiles show how much that load varies
    the result. With
    `update_rate=0` the callback does all its work (counting, reduction, update, metrics) but the routing stays
    Mixtral's, so the ratio is the implementation's cost alone; with a moving bias it also includes the cost
    of a different expert load, which depends on the experts kernel. Both models run `experts_implementation`
    (`None`: transformers' default).
    """
    torch.manual_seed(args.seed)
    mixtral = MixtralForCausalLM(MixtralConfig(**mixtral_sizes(args)))
    lossfree = LossFreeMoeForCausalLM(model_config(args, router_bias_update_rate=update_rate))
    missing, unexpected = lossfree.load_state_dict(mixtral.state_dict(), strict=False)
    if unexpected or any(not key.endswith("e_score_correction_bias") for key in missing):
        raise RuntimeError(f"weights do not transfer: missing {missing}, unexpected {unexpected}")
    if experts_implementation is not None:
        for model in (mixtral, lossfree):
            model.set_experts_implementation(experts_implementation)
    block = data[: args.throughput_steps]
    for model in (mixtral, lossfree):  # warm-up, on copies so that both start the timed blocks equal
        train(copy.deepcopy(model), block[:2], args, None)
    driver = CallbackDriver(LossFreeBalanceCallback(), lossfree, output_dir)
    mixtral_times, lossfree_times = [], []
    for round_index in range(args.throughput_rounds):
        order = [(mixtral, None, mixtral_times), (lossfree, driver, lossfree_times)]
        for model, callback_driver, times in order if round_index % 2 == 0 else order[::-1]:
            times.append(train(model, block, args, callback_driver))
    tokens = args.throughput_steps * args.batch_size * args.seq_len
    used = lossfree.get_experts_implementation()[""]
    ratios = [mixtral_time / lossfree_time for mixtral_time, lossfree_time in zip(mixtral_times, lossfree_times)]
    return ratios, tokens / min(mixtral_times), tokens / min(lossfree_times), used


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="moe_balance_") as scratch:  # TrainingArguments' output_dir
        run(args, scratch)


def run(args: argparse.Namespace, scratch: str) -> None:
    """Train the three ways and print the quality table (unless `--skip-quality`), then the throughput table."""
    train_text, held_out = load_corpus()
    data = batches(train_text, args, args.steps, args.seed + 1)
    if not args.skip_quality:
        quality_table(args, data, held_out, scratch)
    throughput_table(args, data, scratch)


def quality_table(args: argparse.Namespace, data: list[torch.Tensor], held_out: torch.Tensor, scratch: str) -> None:
    """Trains none / aux loss / loss-free from the same weights on `data`; prints eval loss and MaxVio_global."""
    torch.manual_seed(args.seed)
    initial = LossFreeMoeForCausalLM(model_config(args)).state_dict()
    runs = {
        "none": (model_config(args), False),
        f"aux loss {args.aux_coef:g}": (
            model_config(args, router_aux_loss_coef=args.aux_coef, output_router_logits=True),
            False,
        ),
        f"loss-free {args.update_rule} u={args.update_rate:g}": (model_config(args), True),
    }
    print(f"tiny MoE: 8 experts top-2, 2 layers, d=64; {args.steps} steps x {args.batch_size} x {args.seq_len} "
          f"bytes; eval on {args.eval_windows} held-out windows")
    results = {}
    for name, (config, balanced) in runs.items():
        model = LossFreeMoeForCausalLM(config)
        model.load_state_dict(initial)
        driver = None
        if balanced:
            driver = CallbackDriver(LossFreeBalanceCallback(), model, scratch)
        seconds = train(model, data, args, driver)
        if driver is not None:
            driver.callback.balancer.remove()
        results[name] = (*evaluate(model, held_out, args), seconds)

    layers = len(next(iter(results.values()))[1])
    header = f"| {'method':<24} | eval loss | " + " | ".join(f"MaxVio L{i}" for i in range(layers))
    print("\n" + header + " | MaxVio mean | train s |")
    print("|" + "|".join("-" * (len(c) + 2) for c in header.strip("| ").split(" | ")) + "|-------------|---------|")
    for name, (loss, maxvio, seconds) in results.items():
        cells = " | ".join(f"{v:9.3f}" for v in maxvio)
        print(f"| {name:<24} | {loss:9.4f} | {cells} | {sum(maxvio) / layers:11.3f} | {seconds:7.1f} |")
    (aux_name, aux), (free_name, free) = list(results.items())[1:]
    aux_vio, free_vio = sum(aux[1]) / layers, sum(free[1]) / layers
    print(f"\nloss-free / aux MaxVio_global (mean over layers): {free_vio / aux_vio:.3f} (target <= 0.333); "
          f"eval loss loss-free - aux: {free[0] - aux[0]:+.4f} (target <= 0)")


def throughput_table(args: argparse.Namespace, data: list[torch.Tensor], scratch: str) -> None:
    """Prints the throughput ratio at callback rate 0 and `--update-rate`, per experts implementation."""
    print(f"\ntraining throughput, {args.throughput_rounds} rounds of {args.throughput_steps} steps per model, same "
          "initial weights, same experts implementation for both models; ratio = Mixtral time / LossFree + callback "
          "time per round (median and quartiles); tokens/s of each model's fastest block:")
    print("| experts impl | callback rate | ratio (median, >= 0.97) | quartiles   | Mixtral tok/s | LossFree tok/s |")
    print("|--------------|---------------|-------------------------|-------------|---------------|----------------|")
    for implementation in args.experts_implementation or [None]:
        for rate in (0.0, args.update_rate):
            ratios, mixtral_tps, lossfree_tps, used = throughput_ratio(args, data, scratch, rate, implementation)
            q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"| {used:<12} | {rate:<13g} | {median:23.3f} | {q1:.3f}-{q3:.3f} | {mixtral_tps:13.0f} "
                  f"| {lossfree_tps:14.0f} |")


if __name__ == "__main__":
    main()
