"""Give the routers of an existing transformers MoE model a selection-only bias, in place, for loss-free balancing.

`add_router_bias(model)` registers a float32 `e_score_correction_bias` buffer (zeros, one entry per expert) on every
router of `model` and changes the router's class to a cached subclass of its own class, whose `forward` runs the
family's own `forward` under a `torch.overrides.TorchFunctionMode` that intercepts `torch.topk` / `Tensor.topk`.
The intercepted call ranks `scores + bias` and returns, for the chosen experts, the *unbiased* `scores` (a
`gather`) as the top-k values. Whatever the family computes before the top-k (softmax, sigmoid, raw logits,
`F.linear` with a bias, float32 upcasts) and after it (renormalisation, `norm_topk_prob`, scaling factors, a
softmax over the chosen logits as in GPT-OSS and GraniteMoE) is the family's own code, unchanged: the bias only
decides which experts are chosen, and the gate weights are the family's weights for those experts. With a zero
bias the routing, and so the model's output, is the unconverted model's.

A router is a module stored as `gate` or `router` next to an `experts` module. It is supported when its
`forward(hidden_states)` returns `(router_logits, top_k_weights, top_k_index)` and selects the experts with exactly
one `torch.topk` (largest, over the last dimension) whose indices it returns as `top_k_index`. `add_router_bias`
checks this by running every router once on a few random tokens before converting any; the converted forward
checks it again at every call (a router whose training-mode path differs fails loudly instead of ignoring the bias).
Group-limited routers (several top-k calls) and routers that take more inputs than the hidden states are not
supported.

The buffer is persistent: `save_pretrained` writes it, and `model.config.add_router_bias = True` records the
conversion in `config.json`. `AutoModelForCausalLM.from_pretrained` builds the family's unconverted model, for which
the saved biases are unexpected keys (transformers reports and drops them); calling `add_router_bias` on that model
converts it and reads the biases back from the checkpoint's safetensors files (`model.name_or_path`, a local folder
or a Hub id in the cache), renaming the keys as `from_pretrained` does.

Convert the model before wrapping it (PEFT, DeepSpeed ZeRO-3, FSDP): the check runs each router on real weights.
Half-precision scores are ranked in float32 once the float32 bias is added; exactly tied scores keep their order on
CPU (checked), while on CUDA `torch.topk` leaves the order of ties unspecified.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file, logging

from .balancer import BIAS_NAME, Float32RouterBias, find_routers, probe_weight, run_on_probe_tokens

logger = logging.get_logger(__name__)

# Attribute names under which an MoE block (a module with an `experts` child) stores its router.
ROUTER_ATTRIBUTES = ("gate", "router")
# `model.config` flag saved in config.json: the checkpoint's routers carry a bias that `add_router_bias` restores.
CONFIG_FLAG = "add_router_bias"
SUPPORTED_ROUTERS = (
    "A supported router is the `gate` or `router` module of an MoE block (next to its `experts`) whose "
    "`forward(hidden_states)` returns `(router_logits, top_k_weights, top_k_index)` and chooses the experts with a "
    "single `torch.topk` over the expert scores, returning its indices as `top_k_index` (Mixtral, Qwen-MoE, OLMoE, "
    "GPT-OSS, GraniteMoE, ...)"
)
_TOPK_FUNCTIONS = (torch.topk, torch.Tensor.topk)

ModelT = TypeVar("ModelT", bound=nn.Module)


@dataclass(frozen=True)
class _TopKCall:
    """One intercepted top-k: what it ranked and the indices it returned."""

    num_scores: int  # size of the ranked dimension
    picks_largest_along_last: bool
    indices: torch.Tensor


def _topk_arguments(
    input: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
) -> tuple[torch.Tensor, int, int, bool, bool]:
    """`torch.topk`'s arguments, positional or keyword, in signature order."""
    return input, k, dim, largest, sorted


class _ExpertTopK(TorchFunctionMode):
    """Records the `torch.topk` calls made while active; with a bias, the first one selects with the bias.

    Args:
        bias: Added to the scores ranked by the first top-k call (when it ranks `bias.numel()` scores along the
            last dimension), which then returns the unbiased scores of the chosen entries as its values. None only
            records (the support probe).
    """

    def __init__(self, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bias = bias
        self.calls: list[_TopKCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _TOPK_FUNCTIONS:
            return func(*args, **kwargs)
        scores, k, dim, largest, sorted_ = _topk_arguments(*args, **kwargs)
        along_last = largest and scores.dim() > 0 and dim in (-1, scores.dim() - 1)
        num_scores = scores.shape[dim] if scores.dim() > 0 else 1
        if self.bias is None or self.calls or not along_last or num_scores != self.bias.numel():
            result = func(*args, **kwargs)  # the check after the forward rejects what is not the probed pattern
        else:
            indices = torch.topk(scores.detach() + self.bias, k, dim=-1, sorted=sorted_).indices
            result = torch.return_types.topk((scores.gather(-1, indices), indices))
        self.calls.append(_TopKCall(num_scores, along_last, result.indices))
        return result


def _selection_problem(calls: list[_TopKCall], output: Any, num_experts: int | None = None) -> str | None:
    """Why a router forward does not fit the supported pattern, or None when it does.

    Args:
        calls: The top-k calls the forward made.
        output: What the forward returned.
        num_experts: The length of the router's bias once converted; None in the probe.
    """
    if len(calls) != 1:
        return f"its forward calls torch.topk {len(calls)} times, not once"
    if not calls[0].picks_largest_along_last:
        return "its torch.topk does not pick the largest scores along the last dimension"
    if num_experts is not None and calls[0].num_scores != num_experts:
        return f"its torch.topk ranks {calls[0].num_scores} scores, not the {num_experts} of its bias"
    if not (isinstance(output, tuple) and len(output) == 3 and output[2] is calls[0].indices):
        return "it does not return (router_logits, top_k_weights, top_k_index) with the indices of its torch.topk"
    return None


class RouterBiasMixin(Float32RouterBias):
    """Mixed into a router's class by `add_router_bias`: chooses experts with `e_score_correction_bias`.

    The family's `forward` runs unchanged except that its expert top-k ranks `scores + e_score_correction_bias`
    and yields the unbiased scores of the chosen experts. The bias stays float32 under `model.to(dtype)`.
    """

    e_score_correction_bias: torch.Tensor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The family's router forward, choosing the experts with the bias added to the ranked scores.

        Raises:
            RuntimeError: If this call does not fit the pattern `add_router_bias` checked (e.g. a training-only path
                that calls torch.topk differently), since the bias would then be ignored or misapplied.
        """
        bias = self.e_score_correction_bias
        selection = _ExpertTopK(bias)
        with selection:
            output = super().forward(*args, **kwargs)
        problem = _selection_problem(selection.calls, output, bias.numel())
        if problem is not None:
            raise RuntimeError(f"{type(self).__name__} cannot apply its {BIAS_NAME}: {problem}")
        return output

    def __reduce_ex__(self, protocol):
        # The class is made at run time, so pickle has no name to find it by: pickle the family's class instead.
        return _unpickle_router, (type(self).__bases__[1],), self.__getstate__()


@functools.cache
def _with_router_bias(router_class: type[nn.Module]) -> type[nn.Module]:
    """The cached subclass of `router_class` that `add_router_bias` gives its routers."""
    return type(
        f"{router_class.__name__}WithRouterBias",
        (RouterBiasMixin, router_class),
        {"__module__": __name__, "__doc__": f"{router_class.__name__} choosing its experts with {BIAS_NAME}."},
    )


def _unpickle_router(router_class: type[nn.Module]) -> nn.Module:
    """An empty `router_class` router with the bias, for pickle to fill with the saved state."""
    return nn.Module.__new__(_with_router_bias(router_class))


def moe_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(qualified_name, module)` of every router of `model`: a `gate`/`router` child of a module with `experts`.

    A router shared by several blocks is listed once, under its first name.
    """
    routers = {}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "experts", None), nn.Module):
            continue
        for attribute in ROUTER_ATTRIBUTES:
            router = getattr(module, attribute, None)
            if isinstance(router, nn.Module) and id(router) not in routers:
                routers[id(router)] = (f"{name}.{attribute}" if name else attribute, router)
    return list(routers.values())


def _probe(router: nn.Module) -> int:
    """Run `router` once, in eval mode and without grad, on a few random tokens; return its number of experts.

    Raises:
        ValueError: If the router does not choose its experts with one `torch.topk` whose indices it returns (the
            message says why).
    """
    if probe_weight(router) is None:
        raise ValueError("it holds no (num_experts, hidden_size) weight")
    try:
        with _ExpertTopK() as recorder:
            output = run_on_probe_tokens(router)
    except Exception as error:  # any failure of the family's forward on hidden states alone: not supported
        raise ValueError(f"its forward(hidden_states) failed ({type(error).__name__}: {error})") from error
    problem = _selection_problem(recorder.calls, output)
    if problem is not None:
        raise ValueError(problem)
    return recorder.calls[0].num_scores


def router_bias_problem(router: nn.Module) -> str | None:
    """Why `add_router_bias` cannot convert `router`, or None when it can (see `SUPPORTED_ROUTERS`).

    Runs the router's forward once, in eval mode and without grad, on a few random tokens.
    """
    try:
        _probe(router)
    except ValueError as error:
        return str(error)
    return None


def _convert(router: nn.Module, num_experts: int) -> None:
    """Turn `router` into its class's `WithRouterBias` subclass with a zero float32 bias, in place."""
    device = next(router.parameters()).device
    router.__class__ = _with_router_bias(type(router))
    router.register_buffer(BIAS_NAME, torch.zeros(num_experts, dtype=torch.float32, device=device), persistent=True)


def add_router_bias(model: ModelT) -> ModelT:
    """Give every MoE router of `model` a selection-only float32 `e_score_correction_bias`, in place.

    The bias (zeros, shape `(num_experts,)`) is added to the scores the router ranks to choose its top-k experts;
    the gate weights stay the family's weights of the chosen experts, so at zero bias the model computes what it
    did before. `LossFreeBalancer(model)` then balances the model. The conversion is recorded as
    `model.config.add_router_bias = True`; when that flag is already set (a model loaded with `from_pretrained`
    from a converted checkpoint), the saved biases are read back from the checkpoint at `model.name_or_path`.

    A model whose modules already carry an `e_score_correction_bias` (converted before, `LossFreeMoeForCausalLM`,
    DeepSeek-V3, ...) is returned unchanged, so calling this twice is harmless.

    Args:
        model: A transformers MoE model (any `nn.Module`), converted in place.

    Returns:
        `model` itself.

    Raises:
        ValueError: If `model` has no MoE router, or a router that cannot be converted (the message names its class
            and says why). Nothing is converted then.
    """
    if find_routers(model):
        logger.info(f"{type(model).__name__} already has a router bias (`{BIAS_NAME}`); left unchanged")
        return model
    routers = moe_routers(model)
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no MoE router (a `gate` or `router` module next to an `experts` module). "
            f"{SUPPORTED_ROUTERS}."
        )
    num_experts, problems = [], {}
    for _, router in routers:
        try:
            num_experts.append(_probe(router))
        except ValueError as error:
            problems.setdefault(type(router).__name__, str(error))
    if problems:
        reasons = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
        raise ValueError(
            f"add_router_bias cannot convert the routers of {type(model).__name__} ({reasons}). {SUPPORTED_ROUTERS}."
        )
    for (_, router), experts in zip(routers, num_experts):
        _convert(router, experts)
    config = getattr(model, "config", None)
    if config is not None:
        if getattr(config, CONFIG_FLAG, False):
            _restore_saved_biases(model, [name for name, _ in routers])
        setattr(config, CONFIG_FLAG, True)
    return model


def _checkpoint_files(source: str) -> list[str]:
    """Paths of the safetensors files of the checkpoint at `source` holding router biases (a folder or Hub id)."""
    lookup = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    index = cached_file(source, SAFE_WEIGHTS_INDEX_NAME, **lookup)
    if index is None:
        single = cached_file(source, SAFE_WEIGHTS_NAME, **lookup)
        return [] if single is None else [single]
    with open(index) as file:
        weight_map = json.load(file)["weight_map"]
    shards = sorted({shard for key, shard in weight_map.items() if key.endswith(f".{BIAS_NAME}")})
    return [path for path in (cached_file(source, shard, **lookup) for shard in shards) if path is not None]


def _saved_biases(source: str) -> dict[str, torch.Tensor]:
    """The router biases saved in the checkpoint at `source`, by checkpoint key."""
    biases = {}
    for path in _checkpoint_files(source):
        with safe_open(path, framework="pt") as file:
            biases.update({key: file.get_tensor(key) for key in file.keys() if key.endswith(f".{BIAS_NAME}")})
    return biases


def _key_renamer(model: nn.Module):
    """`checkpoint_key -> model_key`, renaming as `from_pretrained` does (the identity for a plain module)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers that loads checkpoints without renaming keys
        return lambda key: key
    if not isinstance(model, PreTrainedModel):
        return lambda key: key
    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    names = dict.fromkeys(model.state_dict(), True)
    return lambda key: rename_source_key(key, renamings, converters, model.base_model_prefix, names)[0]


def _restore_saved_biases(model: nn.Module, router_names: list[str]) -> None:
    """Copy the biases saved in `model.name_or_path`'s checkpoint into the routers just converted; warn on gaps."""
    source = getattr(model, "name_or_path", "") or ""
    try:
        saved = _saved_biases(source) if source else {}
    except (OSError, ValueError):  # a folder that is gone, an id that is no repository
        saved = {}
    if not saved:
        logger.warning(
            f"model.config.{CONFIG_FLAG} is set, but no router bias was found in the checkpoint at {source!r} "
            f"(model.name_or_path); the biases start at zero."
        )
        return
    rename = _key_renamer(model)
    wanted = {f"{name}.{BIAS_NAME}" for name in router_names}
    restored = set()
    with torch.no_grad():
        for key, tensor in saved.items():
            name = rename(key)
            if name in wanted:
                model.get_buffer(name).copy_(tensor)
                restored.add(name)
    if restored != wanted:
        logger.warning(
            f"The checkpoint at {source!r} has no saved bias for {len(wanted - restored)} of {len(wanted)} routers "
            f"(e.g. {sorted(wanted - restored)[0]}); those start at zero."
        )


__all__ = ["CONFIG_FLAG", "RouterBiasMixin", "add_router_bias", "moe_routers", "router_bias_problem"]
