"""Auxiliary-loss-free load balancing: count the tokens each router sends to each expert, then nudge its bias.

Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"), as used by
DeepSeek-V3: every router keeps a per-expert bias `e_score_correction_bias` that is added to the routing
scores only to choose the top-k experts. After each optimizer step the bias moves toward equal load.

`LossFreeBalancer` works with any `torch.nn.Module` whose routers carry that buffer and return
`(router_logits, top_k_weights, top_k_index)` (ours, DeepSeek-V3, GLM-4-MoE, ...). It needs no Trainer;
`LossFreeBalanceCallback` wraps it for `transformers.Trainer`.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging

from ..bias_balancing import (
    UPDATE_RULES,  # noqa: F401  (importable from here, as before the core moved out)
    Float32Bias,
    FollowsOptimizerSteps,
    all_reduce_counts,
    bias_update,
    max_violation,
    validate_update_rate,
    validate_update_rule,
)
from ..optim import _cpu_kernels

logger = logging.get_logger(__name__)

BIAS_NAME = "e_score_correction_bias"
# The routers' bias update where neither the call nor the model config sets one. The linear rule's step shrinks as
# the loads approach equal; over 3 seeds of `benchmarks/moe_balance.py` it reached MaxVio_global < 0.1 in 300-600
# steps with a lower eval loss than the aux loss, where the paper's sign rule at 0.001 needs about 1000.
DEFAULT_ROUTER_UPDATE_RULE = "linear"
DEFAULT_ROUTER_UPDATE_RATE = 5e-3

# A router may have at most one live balancer: two would count every token twice and update twice.
# Weak both ways, so that the registry keeps neither the router nor its balancer alive.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


class Float32RouterBias(Float32Bias):
    """Mixed into router classes holding `e_score_correction_bias`: the bias follows the router's device but stays
    float32 under `model.to(dtype)`, `.half()` and `.bfloat16()`."""

    float32_bias_name = BIAS_NAME


def attached_balancer(model: nn.Module) -> LossFreeBalancer | None:
    """The `LossFreeBalancer` currently hooked to the routers of `model` (or of a module inside it), or None."""
    modules = dict(model.named_modules())
    for name, router in find_routers(model):
        reference = _OWNERS.get(router)
        if reference is not None and reference() is not None:
            return reference()
        for hook in _choosing_module(name, router, modules)[1]._forward_hooks.values():  # a copied router's hook
            if isinstance(hook, _RouterCounter) and hook.balancer.attached:
                return hook.balancer
    return None


class _RouterCounter:
    """The forward hook that counts one router's choices for a balancer (an object, so that it can be found)."""

    def __init__(self, balancer: LossFreeBalancer, layer: int, name: str) -> None:
        self.balancer, self.layer, self.name = balancer, layer, name

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.balancer._count(self.layer, self.name, module, output)


def _fused_kernels() -> ModuleType | None:
    """The fused C++ CPU kernels (`hf_signopt.optim._cpu_kernels`) where they build, else None (torch operations).
    On the CPU each small torch operation inside a training step costs a dispatch and cold caches: the fused bias
    update replaces seven of them with one call, and takes half their time."""
    return _cpu_kernels if _cpu_kernels.load(required=False) is not None else None


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return `(qualified_name, module)` for every module of `model` that holds an `e_score_correction_bias`.

    Each bias is returned once, at the module whose forward uses it. Inside PEFT's `ModulesToSaveWrapper`
    (`modules_to_save=[...]`, recognized by its `original_module` and `modules_to_save` children, without importing
    peft) that is the copy the wrapper runs: `modules_to_save.<active adapter>`, or `original_module` while adapters
    are disabled or none is active. The wrapper itself, which forwards attribute lookups to that copy, and the
    modules it holds but does not run are left out.
    """
    routers = []
    idle: tuple[str, ...] = ()  # name prefixes, each ending with ".", of wrapped modules whose forward does not run
    for name, module in model.named_modules():
        if f"{name}.".startswith(idle):
            continue
        original, copies = module._modules.get("original_module"), module._modules.get("modules_to_save")
        if isinstance(original, nn.Module) and isinstance(copies, nn.ModuleDict):
            active = [] if getattr(module, "disable_adapters", False) else getattr(module, "active_adapters", [])
            runs = f"modules_to_save.{active[0]}" if active and active[0] in copies else "original_module"
            held = ["original_module", *(f"modules_to_save.{adapter}" for adapter in copies)]
            idle += tuple(f"{name}.{child}." if name else f"{child}." for child in held if child != runs)
        elif isinstance(getattr(module, BIAS_NAME, None), torch.Tensor):
            routers.append((name, module))
    return routers


def _choosing_module(name: str, holder: nn.Module, modules: dict[str, nn.Module]) -> tuple[str, nn.Module]:
    """The module whose forward returns the top-k choice that the bias held by `holder` steers, and its name.

    Usually the holder itself (a router). Where the MoE block holds the bias and passes it to its `gate`
    (MiniMax-M2, HY-V3), the gate; where a module holding only the bias sits inside the router (Ernie 4.5's
    `moe_statics`), that router.
    """
    gate = getattr(holder, "gate", None)
    if isinstance(gate, nn.Module) and not isinstance(getattr(gate, BIAS_NAME, None), torch.Tensor):
        return f"{name}.gate", gate
    tensors = [*holder.parameters(recurse=False), *holder.buffers(recurse=False)]
    if "." in name and not any(True for _ in holder.children()) and len(tensors) == 1:
        parent = name.rsplit(".", 1)[0]
        if any(True for _ in modules[parent].parameters(recurse=False)):  # a router with its own weight
            return parent, modules[parent]
    return name, holder


PROBE_TOKENS = 4  # random tokens a router is run on to check it before training
# Updates whose counts are kept for their training MaxVio, computed for all of them at once when the block is full
# or the metrics are read: the update itself then costs a handful of tensor operations.
UPDATES_PER_COUNT_BLOCK = 16


def probe_weight(router: nn.Module) -> torch.Tensor | None:
    """The first 2-D parameter of `router`, `(num_experts, hidden_size)`, or None if it holds none."""
    return next((p for p in router.parameters() if p.dim() == 2), None)


def run_on_probe_tokens(router: nn.Module, *args: Any) -> Any:
    """Call `router(tokens, *args)` once, in eval mode and without grad, on `PROBE_TOKENS` random tokens sized
    by `probe_weight`, and return its output; the training flags of its modules are restored afterwards.

    Raises:
        ValueError: If the router holds no 2-D parameter.
        Exception: Whatever the router's forward raises.
    """
    weight = probe_weight(router)
    if weight is None:
        raise ValueError(f"{type(router).__name__} holds no (num_experts, hidden_size) weight")
    # A private generator, so that the probe does not move the global random state.
    tokens = torch.randn(PROBE_TOKENS, weight.shape[1], generator=torch.Generator().manual_seed(0))
    modes = [(module, module.training) for module in router.modules()]
    router.eval()
    try:
        with torch.no_grad():
            return router(tokens.to(device=weight.device, dtype=weight.dtype), *args)
    finally:
        for module, training in modes:
            module.training = training


def _top_k_index(name: str, router: nn.Module, output: Any) -> torch.Tensor:
    """The `top_k_index` of a router's output `(router_logits, top_k_weights, top_k_index)`.

    Raises:
        TypeError: Naming the router and its class, if the output is not of that form with integer indices.
    """
    if not (isinstance(output, (tuple, list)) and len(output) >= 3 and isinstance(output[2], torch.Tensor)):
        raise TypeError(
            f"router {name} ({type(router).__name__}) must return (router_logits, top_k_weights, top_k_index) for "
            f"LossFreeBalancer to count its tokens, got {type(output).__name__}"
        )
    index = output[2]
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"router {name} returned top_k_index of dtype {index.dtype}, expected an integer dtype")
    return index


def _check_router(name: str, router: nn.Module, holder: nn.Module, num_experts: int) -> None:
    """Run the module the balancer hooks (`router`, choosing with the bias of `holder`) once on random tokens and
    check that it returns the top-k choice the balancer counts, with expert numbers below `num_experts`.

    Skipped where its weights are not plain materialized tensors (the meta device of `from_pretrained`, FSDP2's
    DTensor shards, DeepSpeed ZeRO-3's empty partitions) or where its forward needs more than hidden states: there
    the first training forward checks the output instead.

    Raises:
        TypeError: If the router returns something else (see `_top_k_index`).
        ValueError: If it returns expert numbers outside `[0, num_experts)`.
    """
    weight = probe_weight(router)
    if weight is None or weight.is_meta or weight.numel() == 0 or type(weight.data) is not torch.Tensor:
        return
    # A block that holds the bias passes it to its gate (MiniMax-M2, HY-V3): so does the probe.
    args = (getattr(holder, BIAS_NAME),) if router is not holder and router is getattr(holder, "gate", None) else ()
    try:
        output = run_on_probe_tokens(router, *args)
    except Exception as error:  # a forward that needs more inputs: the first training forward checks it
        logger.debug(f"router {name} could not be probed ({type(error).__name__}: {error}); checked when it runs")
        return
    index = _top_k_index(name, router, output)
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < num_experts:
        raise ValueError(
            f"router {name} ({type(router).__name__}) chose experts {index.unique().tolist()} but its "
            f"{BIAS_NAME} has {num_experts} entries"
        )


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the modules of `model` that choose experts with an `e_score_correction_bias`."""
    modules = dict(model.named_modules())
    choosing = {id(m): m for name, holder in find_routers(model) for m in [_choosing_module(name, holder, modules)[1]]}
    seen, out = set(), []
    for module in choosing.values():
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def maxvio_summary(maxvio: torch.Tensor) -> tuple[float, float] | None:
    """Mean and worst layer of a per-layer MaxVio, over the layers that routed tokens. Synchronizes once.

    A layer that routed no token (NaN) is left out, and a warning says so once; `None` when no layer routed any.
    """
    routed = ~maxvio.isnan()
    highest = maxvio.where(routed, -torch.inf).max()
    mean, highest, idle = torch.stack([maxvio.nanmean(), highest, (~routed).sum()]).tolist()
    if idle:
        logger.warning_once("Some MoE routers saw no token; the MaxVio figures leave them out")
    return None if idle == maxvio.numel() else (mean, highest)


@dataclass(frozen=True)
class LoadBalanceMetrics:
    """Load statistics of the routers over the tokens counted since the last reset.

    Attributes:
        router_names: Qualified module names of the routers, one per layer.
        tokens_per_expert: Integer counts, shape `(num_layers, max_experts)`, summed over ranks.
        num_experts: Experts per layer, an integer tensor of shape `(num_layers,)`, or an int when every layer
            has as many.
    """

    router_names: tuple[str, ...]
    tokens_per_expert: torch.Tensor
    num_experts: torch.Tensor | int

    @functools.cached_property
    def maxvio(self) -> torch.Tensor:
        """MaxVio per layer, float32 on the counting device (NaN where no token was counted); computed when first
        read, so that a training step that nobody reads the metrics of does not pay for them."""
        return max_violation(self.tokens_per_expert, self.num_experts)

    def to_dict(self, prefix: str = "moe/") -> dict[str, float]:
        """Host-side summary: `{prefix}maxvio` (mean over layers) and `{prefix}maxvio_max`. Synchronizes.

        Layers that routed no token are left out (`maxvio_summary`); empty when none routed any.
        """
        summary = maxvio_summary(self.maxvio)
        return {} if summary is None else {f"{prefix}maxvio": summary[0], f"{prefix}maxvio_max": summary[1]}


class LossFreeBalancer(FollowsOptimizerSteps):
    """Counts routed tokens per expert and applies the loss-free bias update once per optimizer step.

    The balancer hooks every router of `model` that carries an `e_score_correction_bias` buffer and reads
    the top-k expert indices the router returns. Counting is exact (int64 on the model's device, no host
    sync). Only forwards of `model` itself count: in training mode with grad enabled for the bias update,
    in eval mode into separate evaluation counts when `count_eval_tokens=True`. Tokens whose attention
    mask is 0 (padding) are skipped. Under gradient checkpointing (reentrant or not) the layers are
    recomputed during backward, after `model`'s forward has returned, so those recomputations are not
    counted again. The counts live in the balancer, not in module buffers, so DDP never broadcasts them.

    Call `step()` after every optimizer step: it sums the counts of all layers across data-parallel ranks
    in one collective, updates every bias in place, zeroes the counts and returns the metrics. Every rank
    then holds the same biases.

    Args:
        model: The model whose forward is called for training (not a DDP wrapper: its inner module).
        update_rate: Step size `u`. Defaults to `model.config.router_bias_update_rate` when the config
            has it, else `DEFAULT_ROUTER_UPDATE_RATE` (0.005; the paper's value for its sign rule is 0.001).
        update_rule: `"sign"`, `"rms"` or `"linear"` (see `bias_update`). Defaults to
            `model.config.router_bias_update_rule` when present, else `DEFAULT_ROUTER_UPDATE_RULE` (`"linear"`).
        process_group: Data-parallel group for the count reduction; the default group when None.
        count_eval_tokens: Also count eval-mode forwards, for `eval_metrics()`. They never move the bias.
        follow_optimizer: Call `step()` automatically after every optimizer step (torch's global step
            post-hook) of an optimizer that holds parameters of `model`, once per step however many
            optimizers step, and only if training tokens were counted since the last update. Models whose
            config asks for balancing (`lossfree_moe` with `router_bias_update_rate > 0`) get such a
            balancer when they are built (`attached_balancer(model)`); `enable_balancing` gives one to any model.

    Raises:
        ValueError: If `model` has no router with an `e_score_correction_bias`, a rate or rule is invalid,
            an explicit argument contradicts the model config, or a router already has a balancer (one
            that follows the optimizer, which models get automatically, is replaced instead, with a log).
            Also if a router, run once on a few random tokens, chooses experts its bias has no entry for.
        TypeError: If that run does not return `(router_logits, top_k_weights, top_k_index)` with integer
            indices. Routers whose weights are not materialized yet (meta device, FSDP2 or ZeRO-3 shards) are
            checked at their first training forward instead.

    Example:
        ```python
        balancer = LossFreeBalancer(model)
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            metrics = balancer.step()
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        update_rate: float | None = None,
        update_rule: str | None = None,
        process_group: dist.ProcessGroup | None = None,
        count_eval_tokens: bool = False,
        follow_optimizer: bool = False,
    ) -> None:
        routers = find_routers(model)
        if not routers:
            raise ValueError(
                f"{type(model).__name__} has no router with an `{BIAS_NAME}` buffer, so there is nothing to "
                "balance. Use a loss-free MoE model (e.g. `LossFreeMoeForCausalLM`) or another MoE family that "
                "carries this buffer (DeepSeek-V3, GLM-4-MoE, ...)."
            )
        previous = attached_balancer(model)
        if previous is not None and previous.follow_optimizer and not follow_optimizer:
            logger.info(f"LossFreeBalancer: replacing the automatic balancer of {type(model).__name__}")
            previous.remove()
        elif previous is not None:
            raise ValueError(
                f"{type(model).__name__} already has a LossFreeBalancer attached; call `.remove()` on it first "
                "(two balancers would count every token twice)."
            )
        config = getattr(model, "config", None)
        self.update_rate = validate_update_rate(
            self._resolve(update_rate, config, "router_bias_update_rate", "update_rate", DEFAULT_ROUTER_UPDATE_RATE),
            "update_rate",
        )
        self.update_rule = validate_update_rule(
            self._resolve(update_rule, config, "router_bias_update_rule", "update_rule", DEFAULT_ROUTER_UPDATE_RULE),
            "update_rule",
        )
        self.model = model
        self.process_group = process_group
        self.count_eval_tokens = count_eval_tokens
        self.follow_optimizer = follow_optimizer
        self.steps_taken = 0  # bias updates so far
        self._counted = False  # training tokens counted since the last update (a host-side flag, no sync)
        self._maxvio_sum: torch.Tensor | None = None  # per layer, over the updates since `pop_training_maxvio`
        self._routed_steps: torch.Tensor | None = None  # per layer, the updates in which it routed tokens
        self.router_names = tuple(name for name, _ in routers)
        # Modules, not tensors: `model.to(...)` replaces buffer tensors, the bias is looked up at each step.
        self._routers = [module for _, module in routers]
        biases = [getattr(module, BIAS_NAME) for module in self._routers]
        for name, bias in zip(self.router_names, biases):
            if bias.numel() == 0 or bias.numel() != max(bias.shape, default=0):
                raise ValueError(
                    f"{name}.{BIAS_NAME} must hold one value per expert, shape (num_experts,) or (1, num_experts); "
                    f"got shape {tuple(bias.shape)}"
                )
            if bias.dtype != torch.float32:
                logger.warning(
                    f"{name}.{BIAS_NAME} is {bias.dtype}, not float32: bias steps of {self.update_rate} may be "
                    "lost to rounding. Keep the router bias in float32."
                )
        device = biases[0].device
        self._experts_per_layer = [b.numel() for b in biases]
        self.num_experts = torch.tensor(self._experts_per_layer, dtype=torch.int64, device=device)
        modules = dict(model.named_modules())
        self._hooked = [_choosing_module(name, holder, modules) for name, holder in routers]
        for (counter_name, counter), (_, holder), experts in zip(self._hooked, routers, self._experts_per_layer):
            _check_router(counter_name, counter, holder, experts)
        shape = (len(routers), max(b.numel() for b in biases))
        # Row `_next_row` of the block counts the current step's training tokens; rows `_unfolded_row` to
        # `_next_row - 1` hold counts of past updates whose MaxVio is not yet in `_maxvio_sum`.
        self._next_row = self._unfolded_row = 0
        self._use_count_block(torch.zeros((UPDATES_PER_COUNT_BLOCK, *shape), dtype=torch.int64, device=device))
        self._eval_counts = torch.zeros(shape, dtype=torch.int64, device=device)
        self._active_counts: torch.Tensor | None = None  # where the current forward of `model` counts
        self._token_mask: torch.Tensor | None = None  # (tokens,) int64 of the current forward, None = all
        self._routed: list[tuple[int, torch.Tensor]] = []  # (layer, top_k_index) of the current forward
        self._layer_numbers = list(range(len(routers)))  # the layers of a usual forward, in order
        self._one = torch.ones((), dtype=torch.int64, device=device)  # expanded: the weight of each choice
        self._mask_position = self._attention_mask_position(model)
        self._warned_mask_shape = False
        self._handles = [
            model.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
            model.register_forward_hook(self._end_forward, always_call=True),
        ]
        self._handles += [
            counter.register_forward_hook(_RouterCounter(self, layer, counter_name))
            for layer, (counter_name, counter) in enumerate(self._hooked)
        ]
        self._moved = False  # a copy of a hooked router counted (PEFT's modules_to_save): refresh at the update
        for router in self._routers:
            _OWNERS[router] = weakref.ref(self)
        self._follow_optimizer_steps(follow_optimizer)

    @staticmethod
    def _resolve(explicit: Any, config: Any, field: str, argument: str, default: Any) -> Any:
        configured = getattr(config, field, None)
        if explicit is not None and configured is not None and explicit != configured:
            raise ValueError(
                f"{argument}={explicit!r} contradicts model.config.{field}={configured!r}; set only one of them"
            )
        if configured is not None:
            return configured
        return default if explicit is None else explicit

    @staticmethod
    def _attention_mask_position(model: nn.Module) -> int | None:
        parameters = list(inspect.signature(model.forward).parameters)
        return parameters.index("attention_mask") if "attention_mask" in parameters else None

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            self._active_counts = self._train_counts
        elif not module.training and self.count_eval_tokens:
            self._active_counts = self._eval_counts
        else:
            self._active_counts = None
            return
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        is_padding_mask = isinstance(mask, torch.Tensor) and mask.dim() == 2
        self._token_mask = mask.reshape(-1).to(torch.int64) if is_padding_mask else None

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._routed:
            self._count_routed()
        self._active_counts = None
        self._token_mask = None

    def _count(self, layer: int, name: str, module: nn.Module, output: Any) -> None:
        """Keep the top-k choice a router returned, counted with the other layers' when the forward of `model`
        ends (called by the router's `_RouterCounter` hook)."""
        if self._active_counts is None:
            return
        if module is not self._hooked[layer][1]:
            self._moved = True
        self._routed.append((layer, _top_k_index(name, module, output)))

    def _count_routed(self) -> None:
        """Add the choices the routers made in this forward to the active counts: every layer in one operation."""
        routed, self._routed = self._routed, []
        counts = self._active_counts
        if counts.device != routed[0][1].device:
            self._move_counts(routed[0][1].device)
            counts = self._active_counts
        indices = [index if index.dim() == 2 else index.reshape(index.shape[0], -1) for _, index in routed]
        layers = [layer for layer, _ in routed]
        if layers == self._layer_numbers and all(
            i.shape == indices[0].shape and i.device == counts.device for i in indices
        ):  # the usual forward: each layer once, in order, on the same tokens and device
            # each row takes only its own layer's choices: an expert number out of range raises
            choices = torch.stack(indices).view(len(indices), -1)
            counts.scatter_add_(1, choices, self._token_weights(indices[0], 0, repeats=len(indices)))
        else:  # a layer routed twice or not at all, other tokens, layers on other devices: one operation per layer
            for layer, index in zip(layers, indices):
                index = index.to(counts.device)
                counts[layer : layer + 1].scatter_add_(1, index.reshape(1, -1), self._token_weights(index, layer))
        if counts is self._train_counts:
            self._counted = True

    def __deepcopy__(self, memo: dict) -> LossFreeBalancer:
        # Copying a router (PEFT's modules_to_save, a reference model made with deepcopy) copies its hooks; the
        # copy's hook counts for this same balancer rather than for a copy of it and of the whole model.
        return self

    def _token_weights(self, index: torch.Tensor, layer: int, repeats: int = 1) -> torch.Tensor:
        """1 for each choice in `index` (tokens, k) of `layer`, 0 for a padding token's (the attention mask, where
        it has one entry per token; otherwise padding is counted, with a warning), flattened, in `repeats` rows (for
        that many layers routing the same tokens); without a mask a view of one element."""
        mask = self._token_mask
        if mask is not None and mask.numel() == index.shape[0]:
            return mask.to(index.device)[None, :, None].expand(repeats, -1, index.shape[1]).reshape(repeats, -1)
        if mask is not None and not self._warned_mask_shape:
            self._warned_mask_shape = True
            logger.warning(
                f"router {self._hooked[layer][0]} saw {index.shape[0]} tokens but the attention mask has "
                f"{mask.numel()} entries; counting every routed token, padding included"
            )
        return self._one.expand(repeats, index.numel())

    def _move_counts(self, device: torch.device) -> None:
        training = self._active_counts is self._train_counts

        def moved(counts: torch.Tensor) -> torch.Tensor:  # counts made on the meta device (from_pretrained) are 0
            return torch.zeros_like(counts, device=device) if counts.is_meta else counts.to(device)

        self._use_count_block(moved(self._count_block))
        self._eval_counts = moved(self._eval_counts)
        self._one = torch.ones((), dtype=torch.int64, device=device)
        self.num_experts = torch.tensor(self._experts_per_layer, dtype=torch.int64, device=device)
        self._active_counts = self._train_counts if training else self._eval_counts

    def _refresh_routers(self) -> None:
        """Update the biases where the model now routes: PEFT's `modules_to_save` moves routing to a copy of each
        router after the balancer was built (the copy's hook counts for this balancer, see `__deepcopy__`)."""
        self._moved = False
        routers = find_routers(self.model)
        if len(routers) == len(self._routers) and any(a is not b for (_, a), b in zip(routers, self._routers)):
            modules = dict(self.model.named_modules())
            self._routers = [module for _, module in routers]
            self._hooked = [_choosing_module(name, holder, modules) for name, holder in routers]
            for router in self._routers:
                _OWNERS[router] = weakref.ref(self)

    @property
    def _num_targets(self) -> torch.Tensor | int:
        """Experts per layer for `bias_update` and `max_violation`: an int when every layer has as many."""
        widths = self._experts_per_layer
        return widths[0] if widths.count(widths[0]) == len(widths) else self.num_experts

    def _update_biases(self, counts: torch.Tensor) -> None:
        """Move every bias by one update from `counts` (see `bias_update`): on the CPU, for the sign and linear
        rules, float32 biases and as many experts in every layer, in one fused C++ call (bit for bit the same)."""
        fusable = self.update_rule in _cpu_kernels.FUSED_BIAS_RULES and isinstance(self._num_targets, int)
        if fusable and counts.is_cpu and (kernels := _fused_kernels()) is not None:
            biases = [getattr(router, BIAS_NAME) for router in self._routers]
            if all(b.is_cpu and b.dtype == torch.float32 and b.is_contiguous() for b in biases):
                kernels.bias_update(counts, biases, self.update_rule, self.update_rate)
                return
        self._add_to_biases(bias_update(counts, self._num_targets, self.update_rule, self.update_rate))

    def _add_to_biases(self, increments: torch.Tensor) -> None:
        """Add each layer's row of `increments` (float32, `(num_layers, max_experts)`) to its router's bias."""
        biases = [getattr(router, BIAS_NAME) for router in self._routers]
        with torch.no_grad():  # in place, also where a bias is a parameter
            if all(b.device == increments.device and b.dtype == torch.float32 for b in biases) and isinstance(
                self._num_targets, int
            ):  # the common case in one operation (the per-layer loop below costs ~10 us per layer on CPU)
                torch._foreach_add_([b if b.dim() == 1 else b.view(-1) for b in biases], increments.unbind(0))
                return
            for layer, bias in enumerate(biases):
                bias.view(-1).add_(increments[layer, : bias.numel()].to(device=bias.device, dtype=bias.dtype))

    def _followed_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """Training counts of this rank since the last `step()`, shape `(num_layers, max_experts)` (a copy)."""
        return self._train_counts.clone()

    def step(self) -> LoadBalanceMetrics:
        """Sum the counts across ranks (one collective), update every bias in place, zero the counts.

        Must be called on every rank, after each optimizer step. No host synchronization.

        Returns:
            The metrics of the tokens counted since the previous call.
        """
        if self._moved:
            self._refresh_routers()
        counts = self._train_counts
        all_reduce_counts(counts, self.process_group)
        self._update_biases(counts)
        self.steps_taken += 1
        self._counted = False
        self._next_row += 1
        if self._next_row < UPDATES_PER_COUNT_BLOCK:
            self._train_counts = self._count_rows[self._next_row]
        else:  # a fresh block: the rows handed out in metrics stay as they are
            self._fold_maxvio()
            self._next_row = self._unfolded_row = 0
            self._use_count_block(torch.zeros_like(self._count_block))
        return LoadBalanceMetrics(self.router_names, counts, self._num_targets)

    def _use_count_block(self, block: torch.Tensor) -> None:
        """Count training tokens in `block`, from its row `_next_row` on (its rows as views, made once)."""
        self._count_block, self._count_rows = block, block.unbind(0)
        self._train_counts = self._count_rows[self._next_row]

    def _fold_maxvio(self) -> None:
        """Add the MaxVio of the updates not yet folded in to the running sums, for all of them at once."""
        done = self._count_block[self._unfolded_row : self._next_row]
        self._unfolded_row = self._next_row
        if not len(done):
            return
        maxvio = max_violation(done, self._num_targets)  # (updates, layers)
        maxvio_sum, routed_steps = maxvio.nan_to_num(0.0).sum(dim=0), (~maxvio.isnan()).sum(dim=0)
        if self._maxvio_sum is None:
            self._maxvio_sum, self._routed_steps = maxvio_sum, routed_steps
        else:
            self._maxvio_sum += maxvio_sum
            self._routed_steps += routed_steps

    def pop_training_maxvio(self) -> torch.Tensor | None:
        """MaxVio per layer averaged over the updates since the last call (NaN for a layer that routed no
        token in any of them), then forgotten; None if no update happened. No synchronization."""
        self._fold_maxvio()
        if self._maxvio_sum is None:
            return None
        mean = self._maxvio_sum / self._routed_steps
        self._maxvio_sum = self._routed_steps = None
        return mean

    def eval_metrics(self, reset: bool = True) -> LoadBalanceMetrics:
        """MaxVio_global of the eval-mode tokens counted so far, summed across ranks (one collective).

        Requires `count_eval_tokens=True`. Must be called on every rank. Never touches the biases.

        Args:
            reset: Zero the evaluation counts afterwards.
        """
        if not self.count_eval_tokens:
            raise RuntimeError("eval_metrics() needs LossFreeBalancer(..., count_eval_tokens=True)")
        counts = self._eval_counts.clone()
        all_reduce_counts(counts, self.process_group)
        if reset:
            self._eval_counts.zero_()
        return LoadBalanceMetrics(self.router_names, counts, self._num_targets)

    def reset_eval_counts(self) -> None:
        """Forget the eval-mode tokens counted so far."""
        self._eval_counts.zero_()

    @property
    def attached(self) -> bool:
        """Whether the balancer is still hooked to its model (not `remove()`d)."""
        return bool(self._handles)

    def remove(self) -> None:
        """Detach the hooks from the model; the balancer stops counting. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for router in self._routers:
            reference = _OWNERS.get(router)
            if reference is not None and reference() is self:
                del _OWNERS[router]
        self._follow_optimizer_steps(False)


def enable_balancing(model: nn.Module, update_rate: float | None = None, update_rule: str | None = None,
                     **kwargs: Any) -> LossFreeBalancer:
    """Balance `model`'s routers after every optimizer step, in any training loop, with no further code.

    For models whose config carries no balancing rate (DeepSeek-V3 and the other families with a native
    `e_score_correction_bias`, or a model given one by `add_router_bias`). `lossfree_moe` models with
    `router_bias_update_rate > 0` are balanced this way from the start. Undo with `disable_balancing`.

    Args:
        model: The model whose forward is called for training.
        update_rate: Bias step size (default: the config's `router_bias_update_rate`, else 0.005).
        update_rule: `"sign"`, `"rms"` or `"linear"` (default: the config's, else `"linear"`).
        **kwargs: Further `LossFreeBalancer` arguments (`process_group`, `count_eval_tokens`).

    Returns:
        The balancer, which also counts evaluation tokens unless `count_eval_tokens=False`.
    """
    kwargs.setdefault("count_eval_tokens", True)
    previous = attached_balancer(model)
    if previous is not None and previous.follow_optimizer:
        previous.remove()
    return LossFreeBalancer(model, update_rate, update_rule, follow_optimizer=True, **kwargs)


def disable_balancing(model: nn.Module) -> None:
    """Stop balancing `model` (the biases stay as they are): remove the balancer attached to its routers, if any."""
    balancer = attached_balancer(model)
    if balancer is not None:
        balancer.remove()
