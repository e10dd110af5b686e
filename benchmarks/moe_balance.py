"""Loss-free load balancing vs an auxiliary loss vs nothing, on a tiny MoE trained on Tiny Shakespeare.

Trains the same tiny `LossFreeMoeForCausalLM` (8 experts, top-2, byte tokens) several ways, for each of `--seeds`
from that seed's initial weights on that seed's batches, with AdamW:

- `none`: no balancing (the bias stays 0: this is Mixtral);
- `aux loss`: Mixtral's auxiliary load-balancing loss (coefficient `--aux-coef`, 0.02 as in Mixtral-8x7B's
  config);
- `loss-free RULE u=RATE`, for each `--loss-free RULE:RATE` (default: the paper's `sign:0.001` and the library's
  default, `linear:0.005`): the model balances itself after every optimizer step, with no callback.

It prints, on held-out text, the eval loss and MaxVio_global (mean over the layers of (max expert load - mean) /
mean over the whole held-out set): mean and spread over the seeds, the worst seed, and whether a loss-free
setting meets the target (MaxVio_global <= 0.1 on every seed, mean eval loss no worse than the aux loss's).
Then it measures the training throughput of `LossFreeMoeForCausalLM` plus the callback's per-step work against
`MixtralForCausalLM` holding the same weights, in interleaved rounds. That training loop is a plain PyTorch loop
calling the callback's `on_step_end` after each optimizer step (what the Trainer does), so that Trainer overhead,
the same for both models, does not dilute the ratio. The throughput is measured with the callback's rate at 0
(routing identical to Mixtral's: the implementation's cost) and at `--update-rate` (the bias moves, so the expert
load differs too), for each `--experts-implementation` given (both models always run the same one; default: the
one transformers picks).

    python benchmarks/moe_balance.py                                  # about 10 minutes on 2 CPU cores
    python benchmarks/moe_balance.py --steps 300 --loss-free sign:0.001 sign:0.003 linear:0.005 linear:0.01
    python benchmarks/moe_balance.py --skip-quality --experts-implementation eager batched_mm grouped_mm

The paper's sign rule moves every bias by u at every step whatever the imbalance: at u=0.001 it needs about 1000
steps on this tiny model (MaxVio_global 0.54 at 300 steps, 0.11 at 600), and a larger u oscillates at a higher
floor (0.17 at u=0.01, 600 steps). The linear rule's step is proportional to each expert's relative imbalance, so
it moves fast while the loads are far apart and slows as they even out.

`--families` prints, instead, per-family tables over the MoE families of the installed transformers, built tiny
by `benchmarks/moe_families.py` (hidden 32, 2 layers, random weights) with `--experts` routed experts (moe_families'
4 where a family does not build with that many), plus `lossfree_moe` at the same sizes:

- balance: every family with a native `e_score_correction_bias` and every one `add_router_bias` converts, its
  weights frozen (no optimizer: the balancer alone moves anything), runs `--bias-updates` forwards in train mode
  of one fixed batch of random tokens (`--family-batch-size` x `--family-seq-len`), each followed by
  `LossFreeBalancer(model, update_rate=--update-rate).step()`; the table gives MaxVio (mean over layers) of the
  first step (zero bias), of the last one and averaged over the last 10% of the steps. What the router ranks
  (softmax probabilities, sigmoid scores or raw logits) sets the scale the bias has to cross, so rows are
  comparable only at the same scale. Where the scores of a tiny random router differ by much less than u, the
  bias overshoots: at the default (linear, u=0.005) flex_olmo, gemma4_text and muse_spark_text end above or near
  their first step's MaxVio; at u=5e-4 they reach 0.02-0.04 in 200 updates (the sign rule at u=0.001 oscillates
  at 0.3-0.5 for them, and needs u=1e-4 and 1000 updates for 0.07-0.09).
- throughput: for `--throughput-families`, forward + backward + optimizer step (`--optimizer`) of one model,
  timed in interleaved blocks balanced by `enable_balancing` (the bias update follows the optimizer step) and
  plain (`disable_balancing`): the same weights in the same memory (ratio = plain time / balanced time, target
  >= 0.99); then a profile: the balancer's functions timed inside balanced training steps, and the tensor
  operations a balanced step adds. The balancer's cost is host work per step, not per token or per MoE layer:
  the bias update in `step()` (one fused C++ call on the CPU, a few small tensor operations with `--torch-ops`
  or on a GPU; the training MaxVio of `UPDATES_PER_COUNT_BLOCK` updates is computed at once) and one count of
  every layer's choices at the end of each forward.

    python benchmarks/moe_balance.py --families                          # about 3 minutes on 2 busy CPU cores
    python benchmarks/moe_balance.py --families --skip-throughput --bias-updates 1000 --only flex_olmo kolibri1
    python benchmarks/moe_balance.py --families --skip-balance --optimizer lion --batch-size 64
    python benchmarks/moe_balance.py --families --skip-balance --throughput-rounds 100 --torch-ops
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import inspect
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MixtralConfig, MixtralForCausalLM, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_signopt import (
    Lion,
    LossFreeBalanceCallback,
    LossFreeBalancer,
    LossFreeMoeConfig,
    LossFreeMoeForCausalLM,
    add_router_bias,
    disable_balancing,
    enable_balancing,
)
from hf_signopt.moe import balancer as balancer_module
from hf_signopt.bias_balancing import UPDATE_RULES, bias_update, validate_update_rate, validate_update_rule
from hf_signopt.moe.balancer import (
    BIAS_NAME,
    DEFAULT_ROUTER_UPDATE_RATE,
    DEFAULT_ROUTER_UPDATE_RULE,
    UPDATES_PER_COUNT_BLOCK,
    find_routers,
)

try:
    from benchmarks.moe_families import TINY, VOCAB, _ranked_kind, model_class, model_inputs, moe_families, tiny_model
except ModuleNotFoundError:  # run as a script: benchmarks/ is on sys.path, the repository root is not
    from moe_families import TINY, VOCAB, _ranked_kind, model_class, model_inputs, moe_families, tiny_model

CORPUS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "tinyshakespeare.txt"
# transformers' experts kernels that run on CPU: a loop over the experts that received tokens, one batched
# matmul over every (token, chosen expert) pair, and torch's grouped matmul over tokens sorted by expert.
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per training run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux-coef", type=float, default=0.02, help="aux-loss coefficient of the baseline")
    parser.add_argument("--update-rate", type=float, default=DEFAULT_ROUTER_UPDATE_RATE,
                        help="bias update rate u of the throughput and --families parts (default: the library's)")
    parser.add_argument("--update-rule", default=DEFAULT_ROUTER_UPDATE_RULE, choices=UPDATE_RULES)
    parser.add_argument("--eval-windows", type=int, default=128, help="held-out windows of --seq-len bytes")
    parser.add_argument("--throughput-steps", type=int, default=None,
                        help=f"steps per timed block (5; --families: {UPDATES_PER_COUNT_BLOCK})")
    parser.add_argument(
        "--throughput-rounds", type=int, default=None, help="interleaved timed blocks per model (20; --families: 100)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the throughput and --families parts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the quality table")
    parser.add_argument(
        "--loss-free", type=loss_free_spec, nargs="+", metavar="RULE:RATE",
        default=[("sign", 0.001, {}), (DEFAULT_ROUTER_UPDATE_RULE, DEFAULT_ROUTER_UPDATE_RATE, {})],
        help="loss-free settings of the quality table (default: the paper's sign:0.001 and the library default)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--experts-implementation", nargs="+", choices=EXPERTS_IMPLEMENTATIONS, default=None,
        help="experts kernels to time, each for both models (default: transformers' choice for this machine)",
    )
    parser.add_argument("--skip-quality", action="store_true", help="only measure the training throughput")
    families = parser.add_argument_group("--families: per-family tables (see the module docstring)")
    families.add_argument("--families", action="store_true", help="print the per-family balance and throughput tables")
    families.add_argument("--bias-updates", type=int, default=200, help="balancer steps per family (frozen weights)")
    families.add_argument("--experts", type=int, default=8, help="routed experts per layer of the tiny models")
    families.add_argument("--family-batch-size", type=int, default=4, help="sequences of the fixed balance batch")
    families.add_argument("--family-seq-len", type=int, default=32, help="tokens per sequence of that batch")
    families.add_argument("--only", nargs="+", default=None, metavar="FAMILY", help="balance table: these families")
    families.add_argument(
        "--throughput-families", nargs="+", default=["lossfree_moe", "deepseek_v3", "qwen3_moe"], metavar="FAMILY",
        help="families of the throughput table (it uses --batch-size x --seq-len tokens per step)",
    )
    families.add_argument("--optimizer", choices=["sgd", "lion"], default="sgd", help="throughput table's optimizer")
    families.add_argument("--skip-balance", action="store_true", help="--families: no balance table")
    parser.add_argument("--torch-ops", action="store_true",
                        help="update the biases with torch operations, not the fused C++ call (as on a GPU)")
    families.add_argument("--skip-throughput", action="store_true", help="--families: no throughput tables")
    args = parser.parse_args()
    if args.throughput_steps is None:  # --families: a block holds one fold of the balancer's MaxVio (see there)
        args.throughput_steps = UPDATES_PER_COUNT_BLOCK if args.families else 5
    if args.throughput_rounds is None:
        args.throughput_rounds = 100 if args.families else 20
    for name in ("steps", "batch_size", "seq_len", "eval_windows", "throughput_steps", "throughput_rounds",
                 "bias_updates", "experts", "family_batch_size", "family_seq_len"):
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
    if args.torch_ops:
        balancer_module._fused_kernels = lambda: None
    if args.families:
        families_tables(args)
        return
    with tempfile.TemporaryDirectory(prefix="moe_balance_") as scratch:  # TrainingArguments' output_dir
        run(args, scratch)


def run(args: argparse.Namespace, scratch: str) -> None:
    """The quality table (unless `--skip-quality`), then the throughput table."""
    train_text, held_out = load_corpus()
    if not args.skip_quality:
        quality_table(args, train_text, held_out)
    throughput_table(args, batches(train_text, args, args.steps, args.seed + 1), scratch)


class VariantBalancer(LossFreeBalancer):
    """The balancer with the variants tried for faster balancing and not kept in the library (benchmark only).

    - `ema=b`: the update reads loads smoothed over steps, `L <- b L + (1 - b) counts` (axolotl's aux-free plugin);
    - `cap=c`: every bias is clamped to `[-c, c]` after each update (ibid.);
    - `warmup=n`: the rate ramps linearly from `u/n` to `u` over the first `n` updates (ibid.);
    - `decay=isqrt`: the rate is `u / sqrt(t)` at the t-th update (seed 000's decaying rate).
    """

    def __init__(self, model: torch.nn.Module, options: dict[str, float | str], **kwargs) -> None:
        super().__init__(model, follow_optimizer=True, **kwargs)
        self.options, self._smoothed = options, None

    def _update_biases(self, counts: torch.Tensor) -> None:
        t, loads = self.steps_taken + 1, counts
        if "ema" in self.options:
            beta = float(self.options["ema"])
            self._smoothed = counts.double() if self._smoothed is None else (
                beta * self._smoothed + (1 - beta) * counts.double())
            loads = self._smoothed
        rate = self.update_rate / math.sqrt(t) if self.options.get("decay") == "isqrt" else self.update_rate
        rate *= min(1.0, t / float(self.options.get("warmup", 1)))
        self._add_to_biases(bias_update(loads, self._num_targets, self.update_rule, rate))

    @torch.no_grad()
    def step(self):
        metrics = super().step()
        if "cap" in self.options:
            for router in self._routers:
                getattr(router, BIAS_NAME).clamp_(-float(self.options["cap"]), float(self.options["cap"]))
        return metrics


VARIANT_OPTIONS = {"ema": float, "cap": float, "warmup": int, "decay": ("isqrt",)}


def loss_free_spec(text: str) -> tuple[str, float, dict]:
    """`--loss-free` value `RULE:RATE[:OPTION=VALUE,...]` (e.g. `linear:0.005`, `sign:0.003:warmup=60`) as
    `(rule, rate, options)`; the options are `VariantBalancer`'s."""
    rule, _, rest = text.partition(":")
    rate, _, option_text = rest.partition(":")
    try:
        options = dict(item.split("=", 1) for item in option_text.split(",") if item)
        for key, value in options.items():
            kind = VARIANT_OPTIONS[key]
            if isinstance(kind, tuple) and value not in kind or not isinstance(kind, tuple) and kind(value) < 0:
                raise ValueError(f"{key}={value}")
        return (validate_update_rule(rule, "--loss-free rule"), validate_update_rate(float(rate), "--loss-free rate"),
                options)
    except (ValueError, KeyError) as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected RULE:RATE[:OPTION=VALUE,...], RULE one of {UPDATE_RULES}, options "
            f"{sorted(VARIANT_OPTIONS)} ({error})"
        )


def quality_run(args: argparse.Namespace, seed: int, train_text: torch.Tensor, held_out: torch.Tensor,
                options: dict | None = None, **config_fields) -> dict:
    """Trains the seed's initial weights on the seed's batches with `config_fields`; eval loss and MaxVio_global.

    A config with `router_bias_update_rate > 0` balances itself after every optimizer step (the library's
    default path, no callback), or through a `VariantBalancer` with `options`; a rate of 0 does not balance.
    """
    torch.manual_seed(seed)
    model = LossFreeMoeForCausalLM(model_config(args, **config_fields))
    if options:  # in place of the model's own balancer
        disable_balancing(model)
        VariantBalancer(model, options)
    seconds = train(model, batches(train_text, args, args.steps, seed + 1), args, None)
    disable_balancing(model)  # whichever balanced it: the eval meter below counts held-out tokens only
    loss, maxvio = evaluate(model, held_out, args)
    return dict(loss=loss, maxvio=sum(maxvio) / len(maxvio), seconds=seconds)


def quality_table(args: argparse.Namespace, train_text: torch.Tensor, held_out: torch.Tensor) -> None:
    """Trains none / aux loss / each `--loss-free` setting for every `--seeds` seed (the same initial weights and
    batches for every method of a seed); prints eval loss and MaxVio_global (mean over layers) per method."""
    methods = {
        "none": dict(router_bias_update_rate=0.0),
        f"aux loss {args.aux_coef:g}": dict(
            router_bias_update_rate=0.0, router_aux_loss_coef=args.aux_coef, output_router_logits=True
        ),
    }
    for rule, rate, options in args.loss_free:
        name = f"loss-free {rule} u={rate:g}" + "".join(f" {key}={value}" for key, value in options.items())
        methods[name] = dict(router_bias_update_rule=rule, router_bias_update_rate=rate, options=options)
    print(f"tiny MoE: 8 experts top-2, 2 layers, d=64; {args.steps} steps x {args.batch_size} x {args.seq_len} "
          f"bytes, AdamW lr {args.lr:g}; eval on {args.eval_windows} held-out windows; seeds {args.seeds}")
    results = {name: [quality_run(args, seed, train_text, held_out, **fields) for seed in args.seeds]
               for name, fields in methods.items()}
    aux = statistics.mean(r["loss"] for r in results[f"aux loss {args.aux_coef:g}"])
    print("\n| method | eval loss (mean +- sd) | MaxVio_global (mean) | MaxVio_global (worst seed) | per seed "
          "(eval loss / MaxVio) | MaxVio <= 0.1 on every seed, eval loss <= aux | train s per run |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        losses, maxvios = [r["loss"] for r in runs], [r["maxvio"] for r in runs]
        per_seed = " ".join(f"{loss:.4f}/{maxvio:.3f}" for loss, maxvio in zip(losses, maxvios))
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        target = "yes" if max(maxvios) <= 0.1 and statistics.mean(losses) <= aux else "no"
        print(f"| {name} | {statistics.mean(losses):.4f} +- {spread:.4f} | {statistics.mean(maxvios):.3f} "
              f"| {max(maxvios):.3f} | {per_seed} "
              f"| {target if name.startswith('loss-free') else ''} "
              f"| {statistics.mean(r['seconds'] for r in runs):.0f} |")


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



# --families: the per-family tables. -----------------------------------------------------------------------------

EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
# Families whose tiny moe_families config is still slow to run (a 200k-column LM head, sliding-window attention
# of 64 heads x 128, Mamba-2 mixers of 128 heads x 64 over 128-token chunks, sparse-attention indexers of 64 heads
# x 128, shared or routed experts 1536 to 4096 wide): smaller values of those fields, so that the balance table's
# forwards of every family fit the time the docstring gives. The routers are unchanged.
_INKLING = {"swa_num_attention_heads": 2, "swa_num_key_value_heads": 2, "swa_head_dim": 16, "rel_extent": 64}
_INDEXER = {"index_head_dim": 16, "index_n_heads": 2}
FAST_OVERRIDES: dict[str, dict] = {
    "axk2": _INDEXER,
    "deepseek_v32": _INDEXER,
    "deepseek_v4": _INDEXER | {"o_lora_rank": 16},
    "dots3_note": _INDEXER | {"shared_experts_intermediate_size": 16},
    "glm_moe_dsa": _INDEXER,
    "hy_v4": _INDEXER,
    "hy_v4_vl_text": _INDEXER,
    "inkling_text": _INKLING,
    "inkling2_text": _INKLING | {"unpadded_vocab_size": VOCAB},
    "inkling2_loop_text": _INKLING | {"unpadded_vocab_size": VOCAB},
    "muse_spark_text": {"moe_hidden_size": 16},
    "nemotron_h": {
        "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 1, "chunk_size": 16,
        "moe_shared_expert_intermediate_size": 16,
    },
}
SOURCE_ORDER = {"lossfree_moe": 0, "native": 1, "converted": 2}


class UnsupportedFamily(Exception):
    """`add_router_bias` rejects the family (see `benchmarks/moe_families.py`)."""


def _config_fields(config_class: type) -> set[str]:
    return set(config_class().to_dict()) | set(config_class.attribute_map)


def family_model(model_type: str, experts: int | None, args: argparse.Namespace, positions: int):
    """The tiny model of `model_type` with a router bias, and where the bias comes from.

    `lossfree_moe` is built at moe_families' tiny sizes (with `--update-rate` / `--update-rule` in its config);
    any other family by `moe_families.tiny_model`, then given a bias by `add_router_bias` unless it has one.

    Args:
        model_type: `lossfree_moe` or a family of `moe_families()`.
        experts: Routed experts per layer; None keeps moe_families' count (4; lossfree_moe's default 8).
        args: The command line (seed, update rate and rule).
        positions: Longest sequence the model will see.

    Returns:
        `(model, source)`, source being `lossfree_moe`, `native` or `converted`.

    Raises:
        UnsupportedFamily: `add_router_bias` rejects the family.
    """
    if model_type == "lossfree_moe":
        config_fields = _config_fields(LossFreeMoeConfig)
        fields = {key: value for key, value in TINY.items() if key in config_fields}
        fields |= dict(max_position_embeddings=max(positions, TINY["max_position_embeddings"]),
                       router_bias_update_rate=args.update_rate, router_bias_update_rule=args.update_rule)
        for key in EXPERT_COUNT_FIELDS if experts is not None else ():
            if key in config_fields:
                fields[key] = experts
        torch.manual_seed(args.seed)
        return LossFreeMoeForCausalLM(LossFreeMoeConfig(**fields)), "lossfree_moe"
    class_name = moe_families()[model_type]
    fields = _config_fields(model_class(model_type, class_name).config_class)
    overrides = {key: experts for key in EXPERT_COUNT_FIELDS if key in fields and experts is not None}
    if "max_position_embeddings" in fields:
        overrides["max_position_embeddings"] = max(positions, TINY["max_position_embeddings"])
    model = tiny_model(model_type, class_name, args.seed, **(overrides | FAST_OVERRIDES.get(model_type, {})))
    if find_routers(model):
        return model, "native"
    try:
        return add_router_bias(model), "converted"
    except ValueError as error:
        raise UnsupportedFamily(str(error)) from error


def family_inputs(model: torch.nn.Module, batch_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """moe_families' inputs for `model` (no cache; decoder inputs for an encoder-decoder) with a
    `batch_size` x `seq_len` batch of random tokens."""
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    return {key: input_ids if key.endswith("input_ids") else value for key, value in model_inputs(model).items()}


def ranked_scores(model: torch.nn.Module) -> str:
    """What the first router ranks (moe_families' probe); `?` where it cannot be called on hidden states alone."""
    try:
        return _ranked_kind(model).replace(" probabilities", "").replace(" scores", "")
    except Exception:  # e.g. a router whose forward also takes the bias or the input ids
        return "?"


def balance_run(model_type: str, experts: int | None, args: argparse.Namespace) -> dict:
    """Frozen weights, one fixed batch, `--bias-updates` train-mode forwards each followed by `balancer.step()`."""
    start = time.perf_counter()
    model, source = family_model(model_type, experts, args, args.family_seq_len)
    inputs = family_inputs(model, args.family_batch_size, args.family_seq_len, args.seed + 1)
    ranks = ranked_scores(model)
    model.requires_grad_(False).train()  # no optimizer: only the balancer changes anything
    balancer = LossFreeBalancer(model, update_rate=args.update_rate, update_rule=args.update_rule)
    torch.manual_seed(args.seed)  # the same dropout masks, if a family has any
    maxvio = []
    try:
        with torch.enable_grad():  # the balancer counts training forwards: train mode with grad enabled
            for _ in range(args.bias_updates):
                model(**inputs)
                maxvio.append(balancer.step().maxvio)
    finally:
        balancer.remove()
    per_step = torch.stack(maxvio).nanmean(dim=1)  # mean over layers
    tail = per_step[-max(1, args.bias_updates // 10):]
    return dict(
        family=model_type, source=source, ranks=ranks,
        experts="/".join(str(e) for e in dict.fromkeys(balancer.num_experts.tolist())),
        layers=len(balancer.router_names), first=per_step[0].item(), last=per_step[-1].item(),
        tail=tail.mean().item(), seconds=time.perf_counter() - start,
    )


def balance_row(model_type: str, args: argparse.Namespace) -> dict | None:
    """`balance_run` with `--experts`, else with moe_families' own count; None for an unsupported family."""
    errors = []
    for experts in dict.fromkeys([args.experts, None]):
        try:
            return balance_run(model_type, experts, args)
        except UnsupportedFamily:
            return None
        except Exception as error:  # e.g. a config that rejects that many experts: retry with its own count
            errors.append(f"{type(error).__name__}: {error}"[:120].replace("|", "/").replace("\n", " "))
    return dict(family=model_type, error="; ".join(errors))


def balance_table(args: argparse.Namespace) -> None:
    """Prints MaxVio at the first and last of `--bias-updates` balancer steps, per family."""
    start = time.perf_counter()
    names = args.only or ["lossfree_moe", *moe_families()]
    moe_families()  # enumerated once, before the first row's time starts
    results = {name: balance_row(name, args) for name in names}
    rows = [row for row in results.values() if row is not None]
    unsupported = [name for name, row in results.items() if row is None]
    ok = sorted((row for row in rows if "error" not in row), key=lambda r: (SOURCE_ORDER[r["source"]], r["family"]))
    n = args.bias_updates
    print(f"balance alone: frozen tiny models (hidden 32, {args.experts} experts where the config allows), one fixed "
          f"batch of {args.family_batch_size} x {args.family_seq_len} random tokens, {n} train-mode forwards each "
          f"followed by LossFreeBalancer(update_rate={args.update_rate:g}, rule={args.update_rule}).step(); MaxVio "
          "is the mean over the MoE layers of (max expert load - mean) / mean for that step's batch\n")
    print(f"| family | bias | router ranks | experts x layers | MaxVio step 1 | MaxVio step {n} "
          f"| mean last {max(1, n // 10)} | s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in ok:
        print(f"| {row['family']} | {row['source']} | {row['ranks']} | {row['experts']} x {row['layers']} "
              f"| {row['first']:.3f} | {row['last']:.3f} | {row['tail']:.3f} | {row['seconds']:.1f} |")
    for row in rows:
        if "error" in row:
            print(f"| {row['family']} | failed | | | | | {row['error']} | |")
    if ok:
        ratios = [row["tail"] / row["first"] for row in ok if row["first"] > 0]
        better = sum(row["tail"] < row["first"] for row in ok)
        counts = ", ".join(f"{sum(r['source'] == source for r in ok)} {source}" for source in SOURCE_ORDER)
        print(f"\n{len(ok)} families balanced ({counts}): MaxVio of the last 10% below step 1's in {better}; median "
              f"of (last 10%) / (step 1) {statistics.median(ratios):.3f}; {time.perf_counter() - start:.0f} s")
    if unsupported:
        print(f"left out, add_router_bias rejects them: {', '.join(unsupported)}")


def _loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    output = model(**inputs)
    loss = getattr(output, "loss", None)
    return loss if loss is not None else output[0].float().square().mean()


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict, steps: int) -> float:
    """Seconds for `steps` forward + backward + optimizer steps (a balancer following the optimizer steps too)."""
    start = time.perf_counter()
    for _ in range(steps):
        _loss(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@contextlib.contextmanager
def timed_calls(targets: list[tuple[object, str]]):
    """Times every call of `getattr(owner, name)` for each `(owner, name)` while active, then puts it back.

    An owner is the balancer (an instance attribute shadows the method: its router hooks call `balancer._count`,
    the optimizer hook `balancer.step`, which calls `self._refresh_routers`) or the balancer module (its
    functions, which `step()` looks up there at each call). Yields `{name: total seconds}` and `{name: calls}`.
    """
    seconds, calls = collections.Counter(), collections.Counter()

    def timed(name: str, function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
                calls[name] += 1
        return call

    saved = [(owner, name, getattr(owner, name), name in vars(owner)) for owner, name in targets]
    for owner, name, function, _ in saved:
        setattr(owner, name, timed(name, function))
    try:
        yield seconds, calls
    finally:
        for owner, name, function, own in saved:
            if own:
                setattr(owner, name, function)
            else:
                delattr(owner, name)


def throughput_family(model_type: str, args: argparse.Namespace) -> dict:
    """Balanced vs plain training throughput of `model_type`, and where the balanced step's extra time goes.

    One model, timed in alternating blocks with a balancer (`enable_balancing`) and without (`disable_balancing`):
    the same weights in the same memory, so the ratio measures the balancing alone. After each switch one untimed
    step; a block of `UPDATES_PER_COUNT_BLOCK` steps pays its share of the MaxVio the balancer folds per block.
    """
    model, source = family_model(model_type, args.experts, args, args.seq_len)
    model.train()
    inputs = family_inputs(model, args.batch_size, args.seq_len, args.seed + 1)
    if "labels" in inspect.signature(model.forward).parameters:
        inputs["labels"] = inputs["input_ids"]
    optimizer = (Lion if args.optimizer == "lion" else torch.optim.SGD)(model.parameters(), lr=args.lr)

    def switch(name: str) -> LossFreeBalancer | None:
        disable_balancing(model)  # a lossfree_moe model balances itself from the start
        balancer = None if name == "plain" else enable_balancing(
            model, update_rate=args.update_rate, update_rule=args.update_rule, count_eval_tokens=False)
        train_steps(model, optimizer, inputs, 1)
        return balancer

    for name in ("plain", "balanced"):  # warm-up (and the optimizer kernels' first build)
        switch(name)
        train_steps(model, optimizer, inputs, 2)
    times = {"plain": [], "balanced": []}
    for round_index in range(args.throughput_rounds):
        for name in ("plain", "balanced") if round_index % 2 == 0 else ("balanced", "plain"):
            switch(name)
            times[name].append(train_steps(model, optimizer, inputs, args.throughput_steps))
    ratios = [p / b for p, b in zip(times["plain"], times["balanced"])]
    extra = statistics.median(b - p for p, b in zip(times["plain"], times["balanced"])) / args.throughput_steps
    balancer = switch("balanced")
    profile_steps = max(20, 4 * args.throughput_steps)
    targets = [(balancer, name) for name in ("_count", "_count_routed", "step", "_update_biases")]
    targets += [(balancer_module, name) for name in ("find_routers", "max_violation")]
    with timed_calls(targets) as (seconds, calls):
        profiled = train_steps(model, optimizer, inputs, profile_steps)
    if calls["step"] != profile_steps:
        raise RuntimeError(f"the balancer stepped {calls['step']} times in {profile_steps} optimizer steps")
    balanced_ops = ops_per_step(model, optimizer, inputs)
    switch("plain")
    extra_ops = balanced_ops - ops_per_step(model, optimizer, inputs)
    tokens = args.batch_size * args.seq_len * args.throughput_steps
    step_ms = {name: 1e3 * statistics.median(block) / args.throughput_steps for name, block in times.items()}
    per_step_us = {name: 1e6 * value / profile_steps for name, value in seconds.items()}
    return dict(
        family=model_type, source=source, layers=len(balancer.router_names), ratios=ratios,
        experts="/".join(str(e) for e in dict.fromkeys(balancer.num_experts.tolist())),
        plain_tps=tokens / statistics.median(times["plain"]),
        balanced_tps=tokens / statistics.median(times["balanced"]),
        step_ms=step_ms, extra_us=1e6 * extra, profiled_ms=1e3 * profiled / profile_steps, us=per_step_us,
        profile_steps=profile_steps, extra_ops=extra_ops,
    )


class _OpCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict) -> float:
    """Tensor operations dispatched per training step, over `UPDATES_PER_COUNT_BLOCK` steps (machine-independent:
    the balancer's host cost is per operation)."""
    counter = _OpCounter()
    with counter:
        train_steps(model, optimizer, inputs, UPDATES_PER_COUNT_BLOCK)
    return counter.ops / UPDATES_PER_COUNT_BLOCK


def throughput_table_families(args: argparse.Namespace) -> None:
    """Prints balanced vs plain training throughput per family, then the balancer's cost inside the steps."""
    results = []
    for name in args.throughput_families:
        try:
            results.append(throughput_family(name, args))
        except Exception as error:
            print(f"{name}: cannot be timed ({type(error).__name__}: {error}"[:200] + ")")
    tokens = args.batch_size * args.seq_len
    print(f"\ntraining throughput, balanced (enable_balancing, u={args.update_rate:g}) vs plain (disable_balancing): "
          f"one model timed with and without its balancer, {tokens} tokens per step ({args.batch_size} x "
          f"{args.seq_len}), {args.optimizer} optimizer, {args.throughput_rounds} interleaved rounds of "
          f"{args.throughput_steps} steps each way (one untimed step after each switch); ratio = plain time / "
          "balanced time per round (median and quartiles: the spread is the load of other processes), tokens/s of "
          "the median blocks\n")
    print("| family | bias | experts x layers | plain tok/s | balanced tok/s | ratio (median, >= 0.99) | quartiles |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        q1, median, q3 = statistics.quantiles(r["ratios"], n=4) if len(r["ratios"]) > 1 else r["ratios"] * 3
        r["median"] = median
        print(f"| {r['family']} | {r['source']} | {r['experts']} x {r['layers']} | {r['plain_tps']:.0f} "
              f"| {r['balanced_tps']:.0f} | {median:.3f} | {q1:.3f}-{q3:.3f} |")
    print(f"\nwhere the balanced step's extra time goes: the balancer's functions timed inside "
          f"{max(20, 4 * args.throughput_steps)} balanced training steps, in microseconds per step: the counting hooks "
          "(`_count`, one call per MoE layer, and `_count_routed`, one per forward), `step()` (the bias update "
          "the optimizer step triggers) and, inside "
          "it, `find_routers` (the traversal of every module that `_refresh_routers` makes after PEFT moved the "
          "routing to router copies), `_update_biases` (the fused C++ update on the CPU, else `bias_update` and "
          "the biases' `_foreach_add_`), `max_violation` (the training MaxVio, for "
          f"{UPDATES_PER_COUNT_BLOCK} updates at once) and the rest (the count reduction, the next row of "
          "counts); against the measured extra time (median over the rounds of balanced - plain block time, per "
          "step); and the tensor operations the balanced step adds (counted over a block of "
          f"{UPDATES_PER_COUNT_BLOCK} steps, balanced minus plain: what the host cost is made of, on any machine)\n")
    print("| family | plain step ms | balanced step ms | measured extra us | counting us | step() us | find_routers us "
          "| _update_biases us | max_violation us | rest of step() us | counting + step() % of the step "
          "| tensor ops added per step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        us, plain_ms, balanced_ms = collections.Counter(r["us"]), r["step_ms"]["plain"], r["step_ms"]["balanced"]
        rest = us["step"] - us["find_routers"] - us["_update_biases"] - us["max_violation"]
        counting = us["_count"] + us["_count_routed"]
        share = 100 * (counting + us["step"]) / (1e3 * r["profiled_ms"])
        print(f"| {r['family']} | {plain_ms:.2f} | {balanced_ms:.2f} | {r['extra_us']:.0f} "
              f"| {counting:.0f} | {us['step']:.0f} | {us['find_routers']:.0f} | {us['_update_biases']:.0f} "
              f"| {us['max_violation']:.0f} | {rest:.0f} | {share:.1f} | {r['extra_ops']:.1f} |")
    slow = [r for r in results if round(r["median"], 3) < 0.99]
    if slow:
        print(f"\nbelow 0.99: {', '.join(r['family'] for r in slow)}; see the profile table (the balancer's work is "
              "a fixed host-side cost per step, a few tensor operations whatever the depth, so its share falls as "
              "the step grows)")


def families_tables(args: argparse.Namespace) -> None:
    """`--families`: the balance table (unless `--skip-balance`), then the throughput and profile tables."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the tiny configs' warnings, once per family
    try:
        print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} "
              "threads\n")
        if not args.skip_balance:
            balance_table(args)
        if not args.skip_throughput:
            throughput_table_families(args)
    finally:
        hf_logging.set_verbosity(verbosity)

if __name__ == "__main__":
    main()
