"""The routers' weights in parameter groups of their own, at a fraction of the learning rate.

A sign optimizer moves every weight by about `lr` per step, however small its gradient. Router weights moved
that fast make the routing logits grow faster than a bias moving `router_bias_update_rate` per step can steer
them, and the load collapses onto a few experts (README, recipe 1). `router_param_groups` gives the routers
`ratio` times their group's learning rate; the Trainer gets it from `optim_args="router_lr_ratio=0.1"` for every
hf_signopt optimizer name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .balancer import router_parameters


def validate_router_lr_ratio(ratio: Any) -> float:
    """Check a router learning-rate ratio (a finite number > 0) and return it as a float."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"router_lr_ratio must be a finite number > 0, got {ratio!r}")
    return float(ratio)


def router_param_groups(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    model: nn.Module,
    ratio: float,
    lr: float | torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Split parameter groups so that the router weights of `model` learn at `ratio` x their group's rate.

    Every group keeps its other settings (weight decay included); its router weights move into a copy of it
    whose `lr` is `ratio` times the group's. Learning-rate schedulers scale every group alike, so the ratio
    holds throughout training.

    Args:
        params: What an optimizer takes: parameters, or parameter-group dicts.
        model: The model whose routers are found (modules choosing experts with an `e_score_correction_bias`).
        ratio: The routers' learning rate over their group's, > 0.
        lr: The learning rate of groups that do not set one (the optimizer's `lr`).

    Returns:
        Parameter groups for the optimizer.

    Raises:
        ValueError: `model` has no router, `ratio` is out of range, or a group with router weights has no `lr`
            and `lr` is not given.
    """
    ratio = validate_router_lr_ratio(ratio)
    routers = {id(p) for p in router_parameters(model)}
    if not routers:
        raise ValueError(
            f"router_lr_ratio: {type(model).__name__} has no MoE router with an `e_score_correction_bias` "
            "(nothing to give a learning rate of its own); use `hf_signopt.add_router_bias(model)` first"
        )
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    split = []
    for group in groups:
        members = list(group["params"])
        others = [p for p in members if id(p) not in routers]
        mine = [p for p in members if id(p) in routers]
        if others:
            split.append({**group, "params": others})
        if mine:
            base = group.get("lr", lr)
            if base is None:
                raise ValueError("router_param_groups: a group with router weights sets no lr; pass lr=")
            split.append({**group, "params": mine, "lr": base * ratio})
    return split
