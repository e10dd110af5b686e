"""Transformers glue: Auto-class registration, `TrainingArguments(optim=...)` registration and `optim_args` parsing."""

from .optim_args import OptimArg, optim_arg_specs, parse_optim_args, split_optim_args
from .optim_registry import SIGN_OPTIMIZERS, register_sign_optimizers
from .trainer_optim import (
    SUPPORTED_TRANSFORMERS,
    TrainerOptimizer,
    get_trainer_optimizer,
    register_trainer_optimizer,
)


__all__ = [
    "SIGN_OPTIMIZERS",
    "SUPPORTED_TRANSFORMERS",
    "OptimArg",
    "TrainerOptimizer",
    "get_trainer_optimizer",
    "optim_arg_specs",
    "parse_optim_args",
    "register_sign_optimizers",
    "register_trainer_optimizer",
    "split_optim_args",
]
