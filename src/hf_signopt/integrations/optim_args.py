"""Typed parsing of `TrainingArguments.optim_args` strings, derived from an optimizer's `__init__` signature.

`optim_args` is a comma-separated list of `key=value` entries (`"window_size=64,threshold=0.2,momentum=ema"`).
The valid keys and their types are read from the optimizer's constructor: each keyword parameter with a
`bool`, `int`, `float`, `str` or `Literal[...]` annotation (optionally `| None`) becomes a key, and a tuple
parameter named like `betas` is exposed as one key per component (`beta1`, `beta2`). Parameters the
Trainer supplies itself (`params`, `lr`, `weight_decay`) and parameters fixed by the optimizer name (for
example `momentum=0` for `signsgd`) are not keys. Unset keys keep the optimizer's own defaults.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union


__all__ = ["OptimArg", "optim_arg_specs", "parse_optim_args", "split_optim_args"]

_TRAINER_SUPPLIED = {
    "lr": "--learning_rate (TrainingArguments.learning_rate)",
    "weight_decay": "--weight_decay (TrainingArguments.weight_decay)",
}
_NOT_KEYS = {"self", "params", *_TRAINER_SUPPLIED}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_INT_PATTERN = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class OptimArg:
    """One `optim_args` key of an optimizer.

    Args:
        key: The name users write in `optim_args` (e.g. `"beta1"`).
        parameter: The constructor parameter it sets (e.g. `"betas"`).
        annotation: The type the value is converted to (`bool`, `int`, `float`, `str`, a `Literal` or an
            optional of one of those).
        default: The constructor's default for this key (for a tuple component, that component).
        index: Position inside a tuple parameter, or `None` for a plain parameter.
    """

    key: str
    parameter: str
    annotation: Any
    default: Any
    index: int | None = None

    def convert(self, text: str) -> Any:
        """Converts the string `text` to this key's type.

        Args:
            text: The value as written in `optim_args`.

        Returns:
            The typed value.

        Raises:
            ValueError: If `text` is not a valid value of the key's type.
        """
        return _convert(text, self.annotation, self.key)


def _describe(annotation: Any) -> str:
    """Returns a short human-readable name of a supported annotation."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _convert(text: str, annotation: Any, key: str) -> Any:
    """Converts `text` to `annotation`, raising a `ValueError` that names the key, the value and the type."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = typing.get_args(annotation)
        if type(None) in members and text.lower() == "none":
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(text, member, key)
            except ValueError:
                continue
    elif origin is Literal:
        for choice in typing.get_args(annotation):
            if text == str(choice):
                return choice
    elif annotation is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    elif annotation is int:
        if _INT_PATTERN.fullmatch(text):
            return int(text)
    elif annotation is float:
        try:
            return float(text)
        except ValueError:
            pass
    elif annotation is str:
        return text
    raise ValueError(f"optim_args: {key}={text!r} is not a valid {_describe(annotation)}.")


def _is_supported(annotation: Any) -> bool:
    """Whether `_convert` can produce values of `annotation`."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return bool(members) and all(_is_supported(arg) for arg in members)
    if origin is Literal:
        return True
    return annotation in (bool, int, float, str)


def _annotation_of(parameter: inspect.Parameter, hints: Mapping[str, Any]) -> Any:
    """The parameter's resolved annotation, else the type of its default, else `None` (unsupported)."""
    annotation = hints.get(parameter.name, inspect.Parameter.empty)
    if annotation is inspect.Parameter.empty:
        default = parameter.default
        if default is inspect.Parameter.empty or default is None:
            return None
        return type(default)
    return annotation


def optim_arg_specs(optimizer_cls: type, fixed: Mapping[str, Any] | None = None) -> dict[str, OptimArg]:
    """Derives the `optim_args` keys of `optimizer_cls` from its `__init__` signature.

    Args:
        optimizer_cls: The optimizer class.
        fixed: Constructor parameters set by the optimizer name itself; they are not keys.

    Returns:
        The keys in signature order, mapped to their `OptimArg`.
    """
    init = optimizer_cls.__init__
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # unresolvable forward references: fall back to defaults' types
        hints = {}
    specs: dict[str, OptimArg] = {}
    for parameter in inspect.signature(init).parameters.values():
        name = parameter.name
        if name in _NOT_KEYS or name in (fixed or {}):
            continue
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        if isinstance(default, tuple) and name.endswith("s") and len(default) > 0:
            annotation = hints.get(name)
            element_types = typing.get_args(annotation) if typing.get_origin(annotation) is tuple else ()
            for index, element_default in enumerate(default):
                element_type = element_types[index] if index < len(element_types) else type(element_default)
                if element_type is Ellipsis:
                    element_type = element_types[0]
                if _is_supported(element_type):
                    key = f"{name[:-1]}{index + 1}"
                    specs[key] = OptimArg(key, name, element_type, element_default, index)
            continue
        annotation = _annotation_of(parameter, hints)
        if annotation is not None and _is_supported(annotation):
            value = None if default is inspect.Parameter.empty else default
            specs[name] = OptimArg(name, name, annotation, value)
    return specs


def split_optim_args(text: str | None) -> dict[str, str]:
    """Splits an `optim_args` string into its `key=value` entries, strictly.

    Whitespace around keys and values is ignored; an empty or `None` string gives no entries.

    Args:
        text: The `optim_args` string, e.g. `"beta1=0.95, beta2=0.98"`.

    Returns:
        The entries as strings, in the order written.

    Raises:
        ValueError: If an entry is empty, is not of the form `key=value`, or repeats a key.
    """
    entries: dict[str, str] = {}
    if text is None or not text.strip():
        return entries
    for position, entry in enumerate(text.split(",")):
        pieces = entry.split("=")
        if len(pieces) != 2 or not pieces[0].strip() or not pieces[1].strip():
            raise ValueError(
                f"Malformed optim_args {text!r}: entry {position + 1} ({entry.strip()!r}) is not of the form "
                "key=value. Write comma-separated key=value pairs, e.g. 'beta1=0.95,beta2=0.98'."
            )
        key, value = pieces[0].strip(), pieces[1].strip()
        if key in entries:
            raise ValueError(f"Malformed optim_args {text!r}: key {key!r} is given more than once.")
        entries[key] = value
    return entries


def parse_optim_args(
    text: str | None, optimizer_cls: type, optim_name: str, fixed: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Parses an `optim_args` string into typed keyword arguments for `optimizer_cls`.

    Only the keys written appear in the result (the optimizer keeps its own defaults for the others), except
    that a tuple parameter is completed from its default when only some of its components are given.

    Args:
        text: The `optim_args` string, or `None`.
        optimizer_cls: The optimizer class whose `__init__` defines the valid keys.
        optim_name: The `TrainingArguments.optim` name, used in error messages.
        fixed: Constructor parameters fixed by `optim_name`; giving one of them is an error.

    Returns:
        Keyword arguments for `optimizer_cls`, without `params`, `lr` and `weight_decay`.

    Raises:
        ValueError: On a malformed string, an unknown or fixed key, or a value of the wrong type.
    """
    specs = optim_arg_specs(optimizer_cls, fixed)
    fixed = dict(fixed or {})
    kwargs: dict[str, Any] = {}
    tuples: dict[str, dict[int, Any]] = {}
    for key, value in split_optim_args(text).items():
        if key not in specs:
            valid = ", ".join(specs) or "(none)"
            if key in _TRAINER_SUPPLIED:
                hint = f" It comes from {_TRAINER_SUPPLIED[key]}."
            elif key in fixed:
                hint = f" optim={optim_name!r} fixes {key}={fixed[key]!r}."
            else:
                hint = ""
            raise ValueError(
                f"Unknown optim_args key {key!r} for optim={optim_name!r}.{hint} Valid keys: {valid}."
            )
        spec = specs[key]
        typed = spec.convert(value)
        if spec.index is None:
            kwargs[spec.parameter] = typed
        else:
            tuples.setdefault(spec.parameter, {})[spec.index] = typed
    for parameter, components in tuples.items():
        defaults = inspect.signature(optimizer_cls.__init__).parameters[parameter].default
        kwargs[parameter] = tuple(components.get(index, default) for index, default in enumerate(defaults))
    return kwargs
