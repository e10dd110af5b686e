"""Wrapping a transformers function in place, so that registering again wraps the original, never our wrapper."""

import functools
from collections.abc import Callable
from typing import Any

_WRAPPED_MARKER = "_hf_signopt_original"


def unwrapped(function: Callable) -> Callable:
    """The function one of our wrappers wraps, or `function` itself (also when another library wrapped it)."""
    return getattr(function, _WRAPPED_MARKER, function)


def wrapping(original: Callable) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: `functools.wraps(original)`, and marks the wrapper as ours (see `unwrapped`)."""

    def decorate(wrapper: Callable[..., Any]) -> Callable[..., Any]:
        functools.update_wrapper(wrapper, original)
        setattr(wrapper, _WRAPPED_MARKER, original)
        return wrapper

    return decorate
