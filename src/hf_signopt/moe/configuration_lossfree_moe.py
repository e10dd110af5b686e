"""Configuration of the loss-free balanced Mixture-of-Experts model: Mixtral's config plus router-bias fields."""

import math
from functools import partial

from huggingface_hub.dataclasses import strict, validated_field
from transformers import MixtralConfig
from transformers.activations import ACT2FN

from .balancer import DEFAULT_ROUTER_UPDATE_RATE, DEFAULT_ROUTER_UPDATE_RULE, validate_update_rate, validate_update_rule

ROUTER_SCORE_FUNCS = ("softmax", "sigmoid")


def _require_positive_int(name: str, value: int) -> None:
    if not value >= 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


def _require_finite_in(name: str, value: float, low: float, high: float, high_inclusive: bool = True) -> None:
    upper_ok = value <= high if high_inclusive else value < high
    if not (math.isfinite(value) and value >= low and upper_ok):
        upper = f"{high}]" if high_inclusive else f"{high})"
        raise ValueError(f"`{name}` must be a finite number in [{low}, {upper}, got {value!r}.")


def _require_one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


@strict
class LossFreeMoeConfig(MixtralConfig):
    r"""Configuration of [`LossFreeMoeForCausalLM`]: a Mixtral model whose routers choose experts with a bias.

    Every Mixtral argument keeps its meaning (see [`~transformers.MixtralConfig`]); only the router differs. Each
    router owns a float32 buffer `e_score_correction_bias` of shape `(num_local_experts,)`, added to the routing
    scores **only to pick the top-k experts**; the gate weights that scale the experts' outputs come from the
    unbiased scores. A balancer (`hf_signopt.LossFreeBalancer`) nudges the bias towards equal expert load after
    each optimizer step (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").
    With a zero bias and `router_score_func="softmax"` the model computes exactly what `MixtralForCausalLM` does.

    Args:
        router_score_func (`str`, *optional*, defaults to `"softmax"`):
            How router logits become scores. `"softmax"`: softmax over the experts, as Mixtral. `"sigmoid"`: an
            independent sigmoid per expert, as DeepSeek-V3 (without its expert groups).
        norm_topk_prob (`bool`, *optional*, defaults to `True`):
            Whether the gate weights of the selected experts are divided by their sum so they add up to 1 per
            token (the name transformers uses in Qwen2-MoE and DeepSeek-V3). `True` with softmax is Mixtral.
        router_bias_update_rate (`float`, *optional*, defaults to 0.005):
            The bias step size `u` the balancer uses (the paper's value for its `"sign"` rule is 0.001). Must be
            finite and >= 0; 0 freezes the bias.
        router_bias_update_rule (`str`, *optional*, defaults to `"linear"`):
            How the balancer moves the bias from the per-expert load `F` (tokens routed to each expert) and its
            mean `Q`. `"sign"`: `b += u * sign(Q - F)` (the paper's); `"rms"`: `b += u * (Q - F) / RMS(F - Q)`;
            `"linear"`: `b += u * (Q - F) / Q`, whose steps shrink as the loads even out (it balances in fewer
            steps: README, "Which update rule and rate").
        router_aux_loss_coef (`float`, *optional*, defaults to 0.0):
            Weight of Mixtral's auxiliary load-balancing loss, added to the language-modeling loss when the model
            runs with `output_router_logits=True`. 0 by default since the bias does the balancing; set it > 0 to
            train the aux-loss baseline. The loss is Mixtral's formula (softmax of the router logits, unbiased
            top-k) whatever `router_score_func` is.

    Every field is validated when the config is built. `router_score_func`, `router_bias_update_rate` and
    `router_aux_loss_coef` are checked again whenever they are set; the other fields, and the constraints between
    fields, when the config is saved or given to a model. A bad value raises
    `huggingface_hub.errors.StrictDataclassError` (as for all transformers configs) whose message names the value
    and the allowed range.

    Example:

    ```python
    >>> import hf_signopt
    >>> from transformers import AutoModelForCausalLM
    >>> config = hf_signopt.LossFreeMoeConfig(
    ...     vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    ... )
    >>> model = AutoModelForCausalLM.from_config(config)
    ```
    """

    model_type = "lossfree_moe"

    # A field's own range is checked whenever the field is set, as transformers' `interval(...)` fields are.
    router_aux_loss_coef: float | int = validated_field(
        partial(_require_finite_in, "router_aux_loss_coef", low=0.0, high=math.inf, high_inclusive=False), default=0.0
    )
    router_score_func: str = validated_field(
        partial(_require_one_of, "router_score_func", choices=ROUTER_SCORE_FUNCS), default="softmax"
    )
    norm_topk_prob: bool = True
    router_bias_update_rate: float | int = validated_field(
        partial(validate_update_rate, source="`router_bias_update_rate`"), default=DEFAULT_ROUTER_UPDATE_RATE
    )
    router_bias_update_rule: str = DEFAULT_ROUTER_UPDATE_RULE

    def __post_init__(self, **kwargs):
        # A Mixtral `config.json` says `model_type="mixtral"`; without this it would shadow the class attribute on
        # the instance, and transformers would then look up Mixtral's (not our) checkpoint conversion and Auto
        # mappings. Loading a Mixtral checkpoint therefore converts it: it is saved back as `lossfree_moe`.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)

    def validate_lossfree_router(self):
        """Part of `@strict`-powered validation: the balancer's update rule and Mixtral's router fields."""
        validate_update_rule(self.router_bias_update_rule, "`router_bias_update_rule`")
        _require_finite_in("router_jitter_noise", self.router_jitter_noise, 0.0, 1.0, high_inclusive=False)
        _require_positive_int("num_local_experts", self.num_local_experts)
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"`num_experts_per_tok` must be in [1, num_local_experts={self.num_local_experts}], "
                f"got {self.num_experts_per_tok!r}."
            )

    def validate_mixtral_sizes(self):
        """Part of `@strict`-powered validation: the Mixtral sizes and numerics this model relies on."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _require_positive_int(name, getattr(self, name))
        _require_positive_int("max_position_embeddings", self.max_position_embeddings)
        if not 1 <= self.num_key_value_heads <= self.num_attention_heads or (
            self.num_attention_heads % self.num_key_value_heads
        ):
            raise ValueError(
                f"`num_key_value_heads` must divide num_attention_heads={self.num_attention_heads} "
                f"(a value in [1, {self.num_attention_heads}]), got {self.num_key_value_heads!r}."
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}) when `head_dim` is None; or set `head_dim` (an even integer >= 2)."
                )
            head_dim = self.hidden_size // self.num_attention_heads
        else:
            head_dim = self.head_dim
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"The attention head dimension must be an even integer >= 2 (rotary), got {head_dim!r}.")
        if self.sliding_window is not None:
            _require_positive_int("sliding_window", self.sliding_window)
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}.")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"`rms_norm_eps` must be a finite number > 0, got {self.rms_norm_eps!r}.")
        _require_finite_in("initializer_range", self.initializer_range, 0.0, math.inf, False)
        _require_finite_in("attention_dropout", self.attention_dropout, 0.0, 1.0)


__all__ = ["LossFreeMoeConfig", "ROUTER_SCORE_FUNCS"]
