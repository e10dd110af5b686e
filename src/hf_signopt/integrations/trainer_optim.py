"""Registration of optimizer classes as `TrainingArguments(optim=...)` names.

Transformers 5.x dispatches `TrainingArguments.optim` in three places, all of which this module extends:

1. `training_args.OptimizerNames` (an `ExplicitEnum`): `TrainingArguments.__post_init__` converts `optim` to
   it, and `HfArgumentParser` offers its values as the `--optim` choices. New members are appended.
2. `trainer_optimizer._OPTIMIZER_HANDLERS`: maps each name to a handler that receives an `OptimizerContext`
   and returns `(optimizer_cls, optimizer_kwargs)`. `Trainer.create_optimizer` then builds the optimizer
   on its own parameter groups, so the Trainer's no-decay grouping of biases and norms still applies.
3. `Trainer.get_optimizer_cls_and_kwargs`: wrapped so that a malformed `optim_args` for one of our names
   fails with a clear message before transformers' lenient parser sees it, and so that `router_lr_ratio` in
   `optim_args` works with every name (transformers' own too). Other names' `optim_args` are untouched.

Registration is idempotent: registering the same name again re-points it, never duplicates it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

import torch
from packaging.version import Version
from transformers.utils import logging

from ..moe.router_lr import router_param_groups, validate_router_lr_ratio
from ._wrapping import unwrapped, wrapping
from .optim_args import parse_optim_args, split_optim_args


__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "TrainerOptimizer",
    "get_trainer_optimizer",
    "register_trainer_optimizer",
]

logger = logging.get_logger(__name__)

SUPPORTED_TRANSFORMERS = ">=5.2,<6"
_TESTED_MIN, _TESTED_BELOW = Version("5.2"), Version("6")
_MEMBER_PREFIX = "HF_SIGNOPT_"
_REGISTRY: dict[str, TrainerOptimizer] = {}


@dataclass(frozen=True)
class TrainerOptimizer:
    """An optimizer class registered under a `TrainingArguments.optim` name.

    Args:
        name: The name users pass as `optim`, e.g. `"simba"`.
        optimizer_cls: The `torch.optim.Optimizer` subclass to build. Its `__init__` must accept `params`,
            `lr` and `weight_decay`; its other keyword parameters become the `optim_args` keys.
        fixed_kwargs: Constructor arguments the name itself fixes (e.g. `{"momentum": 0.0}` for `"signsgd"`);
            they cannot be overridden through `optim_args`.
    """

    name: str
    optimizer_cls: type[torch.optim.Optimizer]
    fixed_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(
                f"Optimizer name {self.name!r} must be letters, digits, '_', '.' or '-' (no spaces or commas)."
            )
        if not (isinstance(self.optimizer_cls, type) and issubclass(self.optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {self.optimizer_cls!r}.")
        accepted = inspect.signature(self.optimizer_cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            unaccepted = [key for key in ("lr", "weight_decay", *self.fixed_kwargs) if key not in accepted]
            if unaccepted:
                raise TypeError(
                    f"{self.optimizer_cls.__name__}.__init__ does not accept {', '.join(unaccepted)}; the Trainer "
                    "passes lr and weight_decay, and fixed_kwargs must name constructor parameters."
                )
        object.__setattr__(self, "fixed_kwargs", MappingProxyType(dict(self.fixed_kwargs)))

    def optimizer_kwargs(self, learning_rate: float, weight_decay: float, optim_args: str | None) -> dict[str, Any]:
        """Keyword arguments (all but `params`) for `optimizer_cls` from the Trainer's arguments.

        Args:
            learning_rate: `TrainingArguments.learning_rate`.
            weight_decay: `TrainingArguments.weight_decay` (the Trainer's no-decay group overrides it with 0).
            optim_args: `TrainingArguments.optim_args`.

        Returns:
            `lr`, `weight_decay`, the fixed arguments and the typed `optim_args`.

        Raises:
            ValueError: If `optim_args` is malformed or names an unknown key or a value of the wrong type.
        """
        kwargs: dict[str, Any] = {"lr": learning_rate, "weight_decay": weight_decay, **self.fixed_kwargs}
        kwargs.update(parse_optim_args(optim_args, self.optimizer_cls, self.name, self.fixed_kwargs))
        return kwargs


def _transformers_internals() -> tuple[type[Enum], dict, type]:
    """Returns `(OptimizerNames, _OPTIMIZER_HANDLERS, Trainer)`, or raises an `ImportError` naming the range.

    Only the absence of the hooked names is reported as an unsupported version; any other import error of
    transformers (a broken environment) propagates unchanged.
    """
    import transformers
    from transformers import Trainer, training_args

    found = getattr(transformers, "__version__", "unknown")
    try:
        trainer_optimizer = importlib.import_module("transformers.trainer_optimizer")
    except ModuleNotFoundError as error:
        if error.name != "transformers.trainer_optimizer":
            raise
        trainer_optimizer = None
    optimizer_names = getattr(training_args, "OptimizerNames", None)
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    missing = [
        name
        for name, ok in (
            ("transformers.trainer_optimizer", trainer_optimizer is not None),
            ("trainer_optimizer._OPTIMIZER_HANDLERS (a dict)", isinstance(handlers, dict)),
            ("trainer_optimizer.OptimizerContext", hasattr(trainer_optimizer, "OptimizerContext")),
            (
                "training_args.OptimizerNames (a str Enum)",
                isinstance(optimizer_names, type)
                and issubclass(optimizer_names, str)
                and issubclass(optimizer_names, Enum),
            ),
            (
                "Trainer.get_optimizer_cls_and_kwargs (a staticmethod)",
                isinstance(Trainer.__dict__.get("get_optimizer_cls_and_kwargs"), staticmethod),
            ),
        )
        if not ok
    ]
    if missing:
        raise ImportError(
            f"hf_signopt registers its optimizers through transformers' Trainer internals, and transformers "
            f"{found} lacks {', '.join(missing)}. Install a supported version: "
            f"pip install 'transformers{SUPPORTED_TRANSFORMERS}'."
        )
    if not _TESTED_MIN <= Version(found) < _TESTED_BELOW:
        logger.warning(
            f"hf_signopt is tested with transformers{SUPPORTED_TRANSFORMERS}, found {found}; the optimizer "
            "registration hooks exist here but are untested."
        )
    return optimizer_names, handlers, Trainer


def _enum_member(enum_cls: type[Enum], value: str) -> Enum:
    """Returns the member of the `str` enum `enum_cls` with `value`, appending it if missing."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    name = _MEMBER_PREFIX + value.upper().replace("-", "_").replace(".", "_")
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member._sort_order_ = len(enum_cls._member_names_)
    member.__objclass__ = enum_cls
    add_member = getattr(enum_cls, "_add_member_", None)  # Python >= 3.13 keeps descriptors consistent
    if add_member is not None:
        add_member(name, member)
    else:
        setattr(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    hashable_values = getattr(enum_cls, "_hashable_values_", None)  # Python >= 3.13: used by `in`
    if isinstance(hashable_values, list):
        hashable_values.append(value)
    return member


def _optim_value(optim: Any) -> str:
    """`TrainingArguments.optim` as a plain string (it is an `OptimizerNames` member after `__post_init__`)."""
    return str(optim.value) if isinstance(optim, Enum) else str(optim)


def _default_learning_rate() -> float:
    """`TrainingArguments`' default `learning_rate` (5e-5 in transformers 5.x), chosen for AdamW."""
    from transformers import TrainingArguments

    return TrainingArguments.__dataclass_fields__["learning_rate"].default


def _sign_optimizer_handler(ctx: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """`_OPTIMIZER_HANDLERS` entry for every registered name: builds `(optimizer_cls, kwargs)` from `ctx.args`."""
    entry = get_trainer_optimizer(_optim_value(ctx.args.optim))
    if ctx.args.learning_rate == _default_learning_rate():
        logger.warning_once(
            f"optim={entry.name!r} trains at learning_rate={ctx.args.learning_rate:g}, TrainingArguments' default, "
            "chosen for AdamW. A sign optimizer moves every weight by about the learning rate at every step: "
            "fine-tuning usually wants 3-10x less than AdamW's rate, pre-training from scratch far more than this "
            "default (README: \"Choosing a sign optimizer's settings\"). Set learning_rate for this optimizer."
        )
    kwargs = dict(ctx.optimizer_kwargs)
    kwargs.update(entry.optimizer_kwargs(ctx.args.learning_rate, ctx.args.weight_decay, ctx.args.optim_args))
    return entry.optimizer_cls, kwargs


ROUTER_LR_KEY = "router_lr_ratio"


def _with_router_lr_ratio(original: Any, args: Any, model: Any) -> tuple[Any, Any]:
    """`original(args, model)` for any `optim` name, where `optim_args` may also hold `router_lr_ratio`: the MoE
    routers then learn at that fraction of the learning rate, in groups of their own split from the Trainer's
    (`router_param_groups`)."""
    ours = _optim_value(args.optim) in _REGISTRY
    if not ours and ROUTER_LR_KEY not in (args.optim_args or ""):
        return original(args, model)  # transformers' own names keep transformers' own optim_args parsing
    entries = split_optim_args(args.optim_args)
    ratio = entries.pop(ROUTER_LR_KEY, None)
    if ratio is None:
        return original(args, model)
    try:
        ratio = validate_router_lr_ratio(float(ratio))
    except ValueError as error:
        raise ValueError(f"optim_args {ROUTER_LR_KEY}={ratio!r}: expected a number > 0") from error
    if model is None:
        raise ValueError(f"optim_args {ROUTER_LR_KEY} needs the model, and the Trainer passed none")
    given, args.optim_args = args.optim_args, ",".join(f"{key}={value}" for key, value in entries.items()) or None
    try:
        optimizer_cls, kwargs = original(args, model)
    finally:
        args.optim_args = given
    if not isinstance(optimizer_cls, type) or "params" in kwargs or "model" in kwargs:
        raise ValueError(f"optim_args {ROUTER_LR_KEY} is not supported with optim={_optim_value(args.optim)!r}, "
                         "which builds its own parameter groups")
    return with_router_learning_rate(optimizer_cls), {**kwargs, "router_model": model, "router_lr_ratio": ratio}


@functools.cache
def with_router_learning_rate(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`optimizer_cls`, taking `router_model=` and `router_lr_ratio=` to put the routers in groups of their own."""

    class RouterLearningRate(optimizer_cls):
        __doc__ = optimizer_cls.__doc__

        def __init__(self, params: Any, *, router_model: torch.nn.Module, router_lr_ratio: float, **kwargs: Any):
            super().__init__(router_param_groups(params, router_model, router_lr_ratio, kwargs.get("lr")), **kwargs)

    RouterLearningRate.__name__ = RouterLearningRate.__qualname__ = optimizer_cls.__name__
    return RouterLearningRate


def _wrap_get_optimizer_cls_and_kwargs(trainer_cls: type) -> None:
    """Makes `trainer_cls.get_optimizer_cls_and_kwargs` reject malformed `optim_args` of our names clearly and
    take `router_lr_ratio` for any name."""
    original = unwrapped(trainer_cls.__dict__["get_optimizer_cls_and_kwargs"].__func__)

    @wrapping(original)
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        return _with_router_lr_ratio(original, args, model)

    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def register_trainer_optimizer(
    name: str, optimizer_cls: type[torch.optim.Optimizer], fixed_kwargs: Mapping[str, Any] | None = None
) -> TrainerOptimizer:
    """Makes `TrainingArguments(optim=name)` (and `--optim name`) build `optimizer_cls` in the `Trainer`.

    `learning_rate` and `weight_decay` come from `TrainingArguments`; the other constructor arguments from
    `optim_args`, typed after `optimizer_cls.__init__`, with the optimizer's own defaults for unset keys.
    Registering a name again replaces its entry. A name transformers already defines is refused.

    Args:
        name: The `optim` name.
        optimizer_cls: The optimizer class.
        fixed_kwargs: Constructor arguments fixed by the name (not settable through `optim_args`).

    Returns:
        The registered entry.

    Raises:
        ImportError: If the installed transformers lacks the hooks (names the supported range).
        ValueError: If `name` is one of transformers' own optimizer names.
    """
    entry = TrainerOptimizer(name, optimizer_cls, fixed_kwargs or {})
    optimizer_names, handlers, trainer_cls = _transformers_internals()
    existing = optimizer_names._value2member_map_.get(name)
    if existing is not None and not existing.name.startswith(_MEMBER_PREFIX):
        raise ValueError(f"optim={name!r} is already a transformers optimizer name; choose another name.")
    member = _enum_member(optimizer_names, name)
    _REGISTRY[name] = entry
    handlers[member] = _sign_optimizer_handler
    _wrap_get_optimizer_cls_and_kwargs(trainer_cls)
    return entry


def get_trainer_optimizer(name: str) -> TrainerOptimizer:
    """Returns the entry registered under `name`.

    Args:
        name: The `optim` name.

    Returns:
        Its `TrainerOptimizer`.

    Raises:
        KeyError: If nothing is registered under `name` (the message lists the registered names).
    """
    if name not in _REGISTRY:
        raise KeyError(f"No hf_signopt optimizer named {name!r}; registered: {', '.join(_REGISTRY) or '(none)'}.")
    return _REGISTRY[name]
