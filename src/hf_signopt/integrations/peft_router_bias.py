"""PEFT adapters carry the router biases: `save_pretrained` of an adapter writes them, loading the adapter sets them.

A router's `e_score_correction_bias` is a buffer of the base model, which the loss-free balancer moves while an
adapter (LoRA on the attention, say) trains. PEFT saves only the adapter's own tensors, so base + reloaded adapter
would route with the pre-training biases. `register_peft_router_bias` (called by `import hf_signopt`) makes PEFT's
`get_peft_model_state_dict`, through which adapter saves go (`PeftModel.save_pretrained`, hence `Trainer`
checkpoints; transformers' `get_adapter_state_dict`), add the routing biases under the model's own state-dict keys
(`base_model.model.model.layers.0.mlp.gate.e_score_correction_bias`). PEFT loads keys it does not rename straight
into the model (`set_peft_model_state_dict`), so `PeftModel.from_pretrained(base, adapter_dir)`, `load_adapter` and
`Trainer(resume_from_checkpoint=...)` restore them with no further code.

Notes:
    - The biases belong to the base model, not to one adapter: loading an adapter sets them for all adapters, and
      `set_adapter` / `disable_adapter()` do not switch them back.
    - A router inside `modules_to_save` is saved by PEFT itself, bias included (the copy that routes), so it is left
      to PEFT; an adapter of a model without routers holds exactly what PEFT saves.
    - `peft.utils.hotswap.hotswap_adapter`, which swaps LoRA tensors only, fails on such adapters (`KeyError`), as it
      does on adapters with `modules_to_save`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..moe.balancer import BIAS_NAME, find_routers

# Where PEFT and its callers look `get_peft_model_state_dict` up: its own module, the packages that re-export it
# (transformers imports it from `peft` when it saves), and `peft.peft_model`, which bound it at import.
_STATE_DICT_NAMESPACES = ("peft.utils.save_and_load", "peft.utils", "peft", "peft.peft_model", "peft.functional")


def router_bias_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The routing biases an adapter checkpoint of `model` must carry, under their keys in `model.state_dict()`.

    Args:
        model: A PEFT model (a `PeftModel`, or a transformers model with an adapter added).
        state_dict: The state dict the adapter is taken from, when the caller passes one; else `model.state_dict()`.

    Returns:
        The persistent routing biases outside PEFT's auxiliary wrappers (`modules_to_save` saves those itself);
        empty for a model without routers.
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    routers = find_routers(model)
    if not routers:
        return {}
    wrappers = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper))
    state_dict = model.state_dict() if state_dict is None else state_dict
    keys = [f"{name}.{BIAS_NAME}" for name, _ in routers if not name.startswith(wrappers)]
    return {key: state_dict[key] for key in keys if key in state_dict}


def _with_router_biases(get_peft_model_state_dict: Callable[..., dict[str, torch.Tensor]]) -> Callable:
    """Wraps PEFT's `get_peft_model_state_dict` so that the adapter state dict also holds the routing biases."""
    signature = inspect.signature(get_peft_model_state_dict)

    @functools.wraps(get_peft_model_state_dict)
    def with_router_biases(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        adapter_state_dict = get_peft_model_state_dict(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        model = arguments["model"]
        if arguments.get("unwrap_compiled", False):
            model = getattr(model, "_orig_mod", model)
        adapter_state_dict.update(router_bias_state_dict(model, arguments.get("state_dict")))
        return adapter_state_dict

    with_router_biases.adds_router_biases = True
    return with_router_biases


def _wrap(save_and_load: Any) -> None:
    """Replace `get_peft_model_state_dict` in `peft.utils.save_and_load` and where it was already re-exported."""
    original = save_and_load.get_peft_model_state_dict
    if getattr(original, "adds_router_biases", False):
        return
    wrapped = _with_router_biases(original)
    for namespace in _STATE_DICT_NAMESPACES:
        module = sys.modules.get(namespace)  # one imported later takes the wrapped function from `peft.utils`
        if module is not None and getattr(module, "get_peft_model_state_dict", None) is original:
            module.get_peft_model_state_dict = wrapped


class _WrapWhenImported(importlib.abc.MetaPathFinder):
    """Wraps PEFT's saving when PEFT is first imported, so that `import hf_signopt` does not import PEFT."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _STATE_DICT_NAMESPACES[0]:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module: Any) -> None:
            exec_module(module)
            _wrap(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


def register_peft_router_bias() -> bool:
    """Makes PEFT adapter checkpoints carry the routing biases (see the module docstring). Idempotent.

    PEFT is wrapped now if it is imported, else as soon as it is (PEFT takes seconds to import).

    Returns:
        Whether PEFT was already imported and is now wrapped.
    """
    module = sys.modules.get(_STATE_DICT_NAMESPACES[0])
    if module is not None:
        _wrap(module)
        return True
    if not any(isinstance(finder, _WrapWhenImported) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WrapWhenImported())
    return False
