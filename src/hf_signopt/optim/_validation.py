"""Hyperparameter and parameter checks shared by the sign optimizers.

Every check raises `ValueError` (or `TypeError` for a wrong type) with a message that names the bad
value and the allowed range, so a typo in a config is caught before the first step.
"""

from numbers import Integral, Real

import torch


def _require_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_non_negative(name: str, value: object) -> None:
    """Require `value` to be a finite real number in `[0, inf)`."""
    number = _require_real(name, value)
    if not (0.0 <= number < float("inf")):
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite value in [0, inf)")


def check_lr(value: object) -> None:
    """Require a learning rate in `[0, inf)`: a real number or a 0-dim floating-point tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(
                f"Invalid lr: a Tensor learning rate must be a 0-dim floating-point tensor; got shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        value = value.item()
    check_non_negative("lr", value)


def check_unit_interval(name: str, value: object, *, include_one: bool = False) -> None:
    """Require `value` in `[0, 1)` (or `[0, 1]` when `include_one`)."""
    number = _require_real(name, value)
    upper_ok = number <= 1.0 if include_one else number < 1.0
    if not (0.0 <= number and upper_ok):
        interval = "[0, 1]" if include_one else "[0, 1)"
        raise ValueError(f"Invalid {name}: {value!r}; expected a value in {interval}")


def check_int_range(name: str, value: object, low: int, high: int) -> None:
    """Require `value` to be an integer in `[low, high]`."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if not (low <= value <= high):
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer in [{low}, {high}]")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Require `value` to be one of `choices`."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(map(repr, choices))}")


def check_optional_bool(name: str, value: object) -> None:
    """Require `value` to be `None`, `True` or `False`."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None or a bool, got {value!r}")


def check_param(param: torch.Tensor) -> None:
    """Refuse parameters the sign optimizers cannot update (sparse layouts, complex dtypes)."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"optimizer parameters must be tensors, got {type(param).__name__}")
    if param.layout != torch.strided:
        raise ValueError(f"sign optimizers support only dense parameters; got layout {param.layout}")
    if param.is_complex():
        raise ValueError(
            f"sign optimizers do not support complex parameters (dtype {param.dtype}); "
            "view them as real with torch.view_as_real first"
        )
    if not param.is_floating_point():
        raise ValueError(f"sign optimizers need floating-point parameters; got dtype {param.dtype}")


def check_grad(grad: torch.Tensor) -> None:
    """Refuse gradients the sign optimizers cannot use (sparse layouts)."""
    if grad.layout != torch.strided:
        raise ValueError(f"sign optimizers do not support sparse gradients; got layout {grad.layout}")
