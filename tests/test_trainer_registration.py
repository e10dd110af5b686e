"""`TrainingArguments(optim=...)` registration: names, parsing, the optimizer the Trainer builds, bad inputs."""

import importlib

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
from transformers.training_args import OptimizerNames

import hf_signopt
from hf_signopt.integrations import get_trainer_optimizer, register_trainer_optimizer
from hf_signopt.optim import Lion, SignMomentum, Signum, Simba


NAMES = {"lion": Lion, "signum": Signum, "signsgd": Signum, "signmomentum": SignMomentum, "simba": Simba}


def _args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


class _Block(nn.Module):
    """Linear layers with biases and a LayerNorm: the Trainer must not decay biases and norm weights."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.down = nn.Linear(8, 2, bias=False)

    def forward(self, x):
        return self.down(self.ln(self.up(x)))


@pytest.mark.parametrize("name", NAMES)
def test_training_arguments_accept_the_names(tmp_path, name):
    args = _args(tmp_path, optim=name)
    assert isinstance(args.optim, OptimizerNames) and args.optim.value == name
    assert OptimizerNames(name) is args.optim
    assert args.to_dict()["optim"] == name


def test_unknown_name_lists_ours(tmp_path):
    with pytest.raises(ValueError, match="simbaa is not a valid OptimizerNames") as error:
        _args(tmp_path, optim="simbaa")
    for name in NAMES:
        assert f"'{name}'" in str(error.value)


def test_import_and_reload_are_idempotent():
    members, handlers = len(OptimizerNames), len(_OPTIMIZER_HANDLERS)
    importlib.reload(hf_signopt)
    importlib.import_module("hf_signopt")
    hf_signopt.register_sign_optimizers()
    assert len(OptimizerNames) == members and len(_OPTIMIZER_HANDLERS) == handlers
    values = [member.value for member in OptimizerNames]
    assert all(values.count(name) == 1 for name in NAMES)
    wrapped = Trainer.get_optimizer_cls_and_kwargs
    assert not hasattr(wrapped.__wrapped__, "__wrapped__")  # wrapped once, not once per registration


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_the_optimizers_own(tmp_path, name):
    args = _args(tmp_path, optim=name, learning_rate=3e-3, weight_decay=0.1, adam_beta1=0.5, adam_beta2=0.6)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is NAMES[name]
    expected = {"lr": 3e-3, "weight_decay": 0.1}
    if name == "signsgd":
        expected["momentum"] = 0.0
    assert kwargs == expected  # nothing from adam_beta*/adam_epsilon


@pytest.mark.parametrize(
    ("name", "optim_args", "expected"),
    [
        ("lion", "beta1=0.95,beta2=0.98", {"betas": (0.95, 0.98)}),
        ("signum", "momentum=0.5", {"momentum": 0.5}),
        ("signmomentum", "momentum=0.8", {"momentum": 0.8}),
        ("simba", "window_size=64,threshold=0.2,momentum=ema,beta=0.9",
         {"window_size": 64, "threshold": 0.2, "momentum": "ema", "beta": 0.9}),
    ],
)
def test_built_optimizer_has_optim_args_and_no_decay_grouping(tmp_path, name, optim_args, expected):
    model = _Block()
    args = _args(tmp_path, optim=name, optim_args=optim_args, learning_rate=2e-3, weight_decay=0.25)
    optimizer = Trainer(model=model, args=args).create_optimizer()
    assert type(optimizer) is NAMES[name]
    decay, no_decay = optimizer.param_groups
    assert {id(p) for p in decay["params"]} == {id(model.up.weight), id(model.down.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.up.bias), id(model.ln.weight), id(model.ln.bias)}
    assert decay["weight_decay"] == 0.25 and no_decay["weight_decay"] == 0.0
    for group in (decay, no_decay):
        assert group["lr"] == 2e-3
        for key, value in expected.items():
            assert group[key] == value, key


def test_registry_entries():
    assert get_trainer_optimizer("signsgd").optimizer_cls is Signum
    assert dict(get_trainer_optimizer("signsgd").fixed_kwargs) == {"momentum": 0.0}
    assert dict(get_trainer_optimizer("simba").fixed_kwargs) == {}
    with pytest.raises(KeyError, match="No hf_signopt optimizer named 'adamw_torch'; registered: lion, signum"):
        get_trainer_optimizer("adamw_torch")


def test_signsgd_builds_signum_without_momentum(tmp_path):
    optimizer = Trainer(model=_Block(), args=_args(tmp_path, optim="signsgd")).create_optimizer()
    assert type(optimizer) is Signum and all(group["momentum"] == 0.0 for group in optimizer.param_groups)


def test_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    assert set(NAMES) <= set(parser._option_string_actions["--optim"].choices)  # what --help lists
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--optim", "simba",
         "--optim_args", "window_size=64,threshold=0.2,momentum=ema", "--learning_rate", "0.01"]
    )
    assert args.optim is OptimizerNames("simba")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is Simba
    assert kwargs == {"lr": 0.01, "weight_decay": 0.0, "window_size": 64, "threshold": 0.2, "momentum": "ema"}


def test_hf_argument_parser_rejects_unknown_names_listing_ours(tmp_path, capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "simbaa"]
        )
    message = capsys.readouterr().err
    assert "invalid choice: 'simbaa'" in message and all(f"'{name}'" in message for name in NAMES)


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("window_size", "Malformed optim_args 'window_size'"),
        ("window_size=64,", "Malformed optim_args"),
        ("windowsize=64", "Unknown optim_args key 'windowsize' for optim='simba'.*window_size, threshold"),
        ("window_size=6.4", "window_size='6.4' is not a valid int"),
    ],
)
def test_bad_optim_args_through_the_trainer(tmp_path, optim_args, message):
    args = _args(tmp_path, optim="simba", optim_args=optim_args)
    with pytest.raises(ValueError, match=message):
        Trainer.get_optimizer_cls_and_kwargs(args)


@pytest.mark.parametrize(
    ("name", "optim_args", "message"),
    [
        ("simba", "window_size=0", "window_size"),
        ("simba", "threshold=1.5", "threshold"),
        ("simba", "momentum=adam", "momentum"),
        ("lion", "beta1=1.5", "1.5"),
        ("signum", "momentum=-0.1", "momentum"),
    ],
)
def test_bad_values_surface_the_optimizers_validation(tmp_path, name, optim_args, message):
    trainer = Trainer(model=_Block(), args=_args(tmp_path, optim=name, optim_args=optim_args))
    with pytest.raises(ValueError, match=message):
        trainer.create_optimizer()


def test_transformers_names_are_not_taken_over():
    with pytest.raises(ValueError, match="'sgd' is already a transformers optimizer name"):
        register_trainer_optimizer("sgd", Lion)
    assert _OPTIMIZER_HANDLERS[OptimizerNames.SGD].__module__.startswith("transformers")


def test_registration_checks_the_constructor():
    class NoDecay(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-3):
            super().__init__(params, {"lr": lr})

    with pytest.raises(TypeError, match="NoDecay.__init__ does not accept weight_decay"):
        register_trainer_optimizer("nodecay", NoDecay)
    with pytest.raises(TypeError, match="does not accept nesterov"):
        register_trainer_optimizer("lion_nesterov", Lion, {"nesterov": True})
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer subclass"):
        register_trainer_optimizer("not_an_optimizer", dict)
    with pytest.raises(ValueError, match="no spaces or commas"):
        register_trainer_optimizer("my opt", Lion)
    assert "nodecay" not in [member.value for member in OptimizerNames]


def test_missing_internals_raise_import_error_naming_the_range(monkeypatch):
    import transformers.trainer_optimizer

    monkeypatch.delattr(transformers.trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(ImportError, match=r"transformers>=5\.2,<6"):
        register_trainer_optimizer("lion", Lion)


def test_adamw_default_learning_rate_is_reported_once(tmp_path, caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("hf_signopt.integrations.trainer_optim").warning_once.cache_clear()
    for _ in range(2):
        Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="lion"))
    Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="lion", learning_rate=1e-4))
    reported = [record.getMessage() for record in caplog.records if "TrainingArguments' default" in record.getMessage()]
    assert len(reported) == 1
    assert reported[0].startswith("optim='lion' trains at learning_rate=5e-05, TrainingArguments' default")
