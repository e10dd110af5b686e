"""The loss-free MoE pieces of the recipes: model arguments, config, balancing modes, expert loads."""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel, TrainerCallback

from hf_signopt import LossFreeBalanceCallback, LossFreeBalancer, LossFreeMoeConfig
from hf_signopt.moe.balancer import find_routers


BALANCING_MODES = ("loss-free", "aux-loss", "none")
MIXTRAL_AUX_LOSS_COEF = 0.02
"""`router_aux_loss_coef` of the released Mixtral-8x7B config (transformers' `MixtralConfig` default is
0.001), used by the `aux-loss` mode unless one is given; the project's balancing benchmark uses it too."""

SMALL_MOE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_score_func": "softmax",
    "router_bias_update_rule": "sign",
    "router_bias_update_rate": 0.001,
}
"""The default model: 4 layers of 8 experts (top-2), about 3.9 M parameters with a 2048-token vocabulary.

Its routers use the paper's sign rule at u = 0.001; `MoeModelArguments.router_learning_rate_ratio` (0.1 by
default) keeps their logits within reach of that bias."""


@dataclass
class MoeModelArguments:
    """The MoE model to pre-train, its tokenizer and how its experts are balanced.

    Size and router fields left unset come from `config_name` when given, else from the small default
    (`SMALL_MOE`). `vocab_size` and `max_position_embeddings` follow the tokenizer and `block_size`.

    Args:
        config_name: A `lossfree_moe` (or Mixtral) `config.json` or model directory to start from.
        tokenizer_name: A tokenizer directory to use instead of training a byte-level BPE.
        tokenizer_vocab_size: Vocabulary of the trained BPE tokenizer, at least 257.
        balancing: `loss-free` (router bias + `LossFreeBalanceCallback`), `aux-loss` (Mixtral's
            auxiliary loss, bias frozen) or `none`.
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        num_local_experts, num_experts_per_tok: Mixtral sizes.
        router_score_func: `softmax` or `sigmoid`.
        router_bias_update_rule: `sign`, `rms` or `linear`.
        router_bias_update_rate: Bias step `u` per optimizer step, >= 0.
        router_aux_loss_coef: Auxiliary-loss weight; default 0, or Mixtral-8x7B's 0.02 in `aux-loss` mode.
        router_learning_rate_ratio: The routers' learning rate as a fraction of `learning_rate`, in (0, 1].
            Default 0.1: a sign optimizer moves every router weight by about `lr` per step whatever the size of
            its gradient, so at the full rate the router logits grow until the softmax is nearly one-hot and no
            bias of a few tenths can move a token (see the README, recipe 1).
    """

    config_name: str | None = field(default=None, metadata={"help": "Config file or model dir to start from."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer dir instead of training one."})
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the trained BPE (>= 257)."})
    balancing: str = field(default="loss-free", metadata={"help": f"One of {BALANCING_MODES}."})
    hidden_size: int | None = field(default=None, metadata={"help": "Hidden size."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Expert MLP size."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Decoder layers."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Attention heads."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Key/value heads."})
    num_local_experts: int | None = field(default=None, metadata={"help": "Experts per layer."})
    num_experts_per_tok: int | None = field(default=None, metadata={"help": "Experts chosen per token."})
    router_score_func: str | None = field(default=None, metadata={"help": "softmax or sigmoid."})
    router_bias_update_rule: str | None = field(default=None, metadata={"help": "sign, rms or linear."})
    router_bias_update_rate: float | None = field(default=None, metadata={"help": "Bias step per optimizer step."})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "Auxiliary-loss weight."})
    router_learning_rate_ratio: float = field(
        default=0.1, metadata={"help": "Routers' learning rate / learning_rate, in (0, 1]."}
    )

    def __post_init__(self) -> None:
        if not 0 < self.router_learning_rate_ratio <= 1:
            raise ValueError(f"router_learning_rate_ratio must be in (0, 1], got {self.router_learning_rate_ratio}.")
        if self.balancing not in BALANCING_MODES:
            raise ValueError(f"balancing must be one of {BALANCING_MODES}, got {self.balancing!r}.")
        if self.tokenizer_vocab_size < 257:
            raise ValueError(
                f"tokenizer_vocab_size must be >= 257 (256 bytes + 1 special), got {self.tokenizer_vocab_size}."
            )
        if self.balancing == "none" and self.router_aux_loss_coef:
            raise ValueError(
                f"balancing='none' trains without balancing, but router_aux_loss_coef={self.router_aux_loss_coef}; "
                "use balancing='aux-loss' or leave the coefficient unset."
            )
        if self.balancing == "aux-loss" and self.router_aux_loss_coef is not None and self.router_aux_loss_coef <= 0:
            raise ValueError(f"balancing='aux-loss' needs router_aux_loss_coef > 0, got {self.router_aux_loss_coef}.")

    def config_overrides(self) -> dict[str, Any]:
        """The size and router fields that were set explicitly."""
        names = [*SMALL_MOE, "router_aux_loss_coef"]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def build_moe_config(
    model_args: MoeModelArguments, vocab_size: int, block_size: int, special_ids: dict[str, int]
) -> LossFreeMoeConfig:
    """Builds the `LossFreeMoeConfig` to pre-train from the arguments.

    Args:
        model_args: The model arguments.
        vocab_size: The tokenizer's vocabulary size.
        block_size: The training sequence length (becomes `max_position_embeddings` when larger
            than the starting config's).
        special_ids: `bos_token_id`, `eos_token_id`, `pad_token_id` of the tokenizer.

    Returns:
        The config, with `output_router_logits` on exactly when the aux loss is used.
    """
    if model_args.config_name is not None:
        base = AutoConfig.from_pretrained(model_args.config_name).to_dict()
        for key in ("model_type", "transformers_version", "architectures", "auto_map"):
            base.pop(key, None)
    else:
        base = dict(SMALL_MOE)
    values = {**base, **model_args.config_overrides(), **special_ids, "vocab_size": vocab_size}
    values["max_position_embeddings"] = max(values.get("max_position_embeddings") or 0, block_size)
    if model_args.balancing == "aux-loss":
        values["router_aux_loss_coef"] = model_args.router_aux_loss_coef or MIXTRAL_AUX_LOSS_COEF
    elif model_args.balancing == "none":
        values["router_aux_loss_coef"] = 0.0
    values["output_router_logits"] = values.get("router_aux_loss_coef", 0.0) > 0
    return LossFreeMoeConfig(**values)


def scale_router_learning_rate(optimizer: torch.optim.Optimizer, model: torch.nn.Module, ratio: float) -> None:
    """Moves the weights of `model`'s bias-carrying routers into their own parameter groups at `ratio` x lr.

    Each group that holds router weights is split in two with the same settings, so weight decay and the
    optimizer's hyperparameters stay as they were. Call it before the learning-rate scheduler is built (the
    scheduler scales every group's initial rate). Nothing changes when `ratio` is 1.

    Args:
        optimizer: The optimizer over `model`'s parameters.
        model: A model whose routers carry `e_score_correction_bias`.
        ratio: Router learning rate / learning rate, in (0, 1].
    """
    if ratio == 1:
        return
    router_ids = {id(p) for _, router in find_routers(model) for p in router.parameters()}
    router_groups = []
    for group in optimizer.param_groups:
        routers = [p for p in group["params"] if id(p) in router_ids]
        if routers:
            group["params"] = [p for p in group["params"] if id(p) not in router_ids]
            settings = {key: value for key, value in group.items() if key != "params"}
            router_groups.append({**settings, "params": routers, "lr": group["lr"] * ratio})
    for group in router_groups:
        optimizer.add_param_group(group)


def balancing_callbacks(balancing: str) -> list[TrainerCallback]:
    """The Trainer callbacks of a balancing mode: `LossFreeBalanceCallback` for `loss-free`, none else."""
    return [LossFreeBalanceCallback()] if balancing == "loss-free" else []


def routing_summary(config: Any, balancing: str) -> dict[str, Any] | None:
    """Routing facts for the model card, or `None` when the config has no bias-routed experts."""
    if not hasattr(config, "router_bias_update_rule"):
        return None
    return {
        "balancing": balancing,
        "score_func": config.router_score_func,
        "update_rule": config.router_bias_update_rule,
        "update_rate": config.router_bias_update_rate,
        "aux_loss_coef": config.router_aux_loss_coef,
        "num_experts": config.num_local_experts,
        "top_k": config.num_experts_per_tok,
    }


@torch.no_grad()
def measure_expert_load(
    model: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]], callbacks: Iterable[TrainerCallback] = ()
) -> dict[str, Any]:
    """Counts the tokens each expert of each layer receives over `batches`, in eval mode.

    Uses the balancer that a `LossFreeBalanceCallback` in `callbacks` already attached to `model`,
    else attaches (and afterwards removes) a counting-only `LossFreeBalancer`; biases never move.
    Every data-parallel rank must call this (the counts are summed across ranks).

    Args:
        model: A model whose routers carry `e_score_correction_bias`.
        batches: Model inputs, e.g. the Trainer's evaluation dataloader.
        callbacks: The Trainer's callbacks.

    Returns:
        `tokens_per_expert` (layers x experts, ints), `maxvio_per_layer` and `maxvio_global`
        (MaxVio of the summed loads, mean over layers) and `router_names`.
    """
    attached = [c.balancer for c in callbacks if isinstance(c, LossFreeBalanceCallback) and c.balancer is not None]
    balancer = attached[0] if attached else LossFreeBalancer(model, count_eval_tokens=True)
    was_training = model.training
    model.eval()
    try:
        balancer.reset_eval_counts()
        for batch in batches:
            model(**{k: v.to(model.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        metrics = balancer.eval_metrics(reset=True)
    finally:
        model.train(was_training)
        if not attached:
            balancer.remove()
    per_layer = metrics.maxvio.tolist()
    return {
        "router_names": list(metrics.router_names),
        "tokens_per_expert": metrics.tokens_per_expert.tolist(),
        "maxvio_per_layer": per_layer,
        "maxvio_global": sum(per_layer) / len(per_layer),
    }
