"""`optim_args` parsing: keys and types derived from an optimizer's `__init__`, strict syntax, clear errors."""

from collections.abc import Callable
from typing import Literal

import pytest
import torch

from hf_signopt.integrations import SIGN_OPTIMIZERS, optim_arg_specs, parse_optim_args, split_optim_args


class _Probe(torch.optim.Optimizer):
    """An optimizer signature exercising every supported kind of parameter (never stepped)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.8, 0.95),
        weight_decay: float = 0.0,
        window_size: int = 16,
        threshold: float = 0.5,
        momentum: Literal["counts", "ema"] = "counts",
        nesterov: bool = False,
        eps=1e-8,
        hook: Callable | None = None,
        *,
        foreach: bool | None = None,
    ):
        super().__init__(params, {"lr": lr})


_PROBE_KEYS = ["beta1", "beta2", "window_size", "threshold", "momentum", "nesterov", "eps", "foreach"]


def test_keys_follow_the_signature():
    assert list(optim_arg_specs(_Probe)) == _PROBE_KEYS
    assert list(optim_arg_specs(_Probe, fixed={"momentum": "ema"})) == [k for k in _PROBE_KEYS if k != "momentum"]


def test_values_are_typed():
    kwargs = parse_optim_args(
        " window_size = 64, threshold=0.2,momentum=ema,nesterov=TRUE,eps=1e-6,foreach=none", _Probe, "probe"
    )
    assert kwargs == {
        "window_size": 64,
        "threshold": 0.2,
        "momentum": "ema",
        "nesterov": True,
        "eps": 1e-6,
        "foreach": None,
    }
    assert type(kwargs["window_size"]) is int and type(kwargs["threshold"]) is float
    assert parse_optim_args("threshold=1,nesterov=0,foreach=yes", _Probe, "probe") == {
        "threshold": 1.0,
        "nesterov": False,
        "foreach": True,
    }
    assert type(parse_optim_args("threshold=1", _Probe, "probe")["threshold"]) is float


@pytest.mark.parametrize(
    ("text", "betas"),
    [("beta1=0.5", (0.5, 0.95)), ("beta2=0.5", (0.8, 0.5)), ("beta2=0.25,beta1=0.5", (0.5, 0.25))],
)
def test_beta_components_map_onto_betas(text, betas):
    assert parse_optim_args(text, _Probe, "probe") == {"betas": betas}


@pytest.mark.parametrize("text", [None, "", "   "])
def test_empty_gives_the_optimizer_defaults(text):
    assert parse_optim_args(text, _Probe, "probe") == {}


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown optim_args key 'windowsize' for optim='probe'") as error:
        parse_optim_args("windowsize=3", _Probe, "probe")
    assert "Valid keys: " + ", ".join(_PROBE_KEYS) + "." in str(error.value)


@pytest.mark.parametrize(("key", "hint"), [("lr", "--learning_rate"), ("weight_decay", "--weight_decay")])
def test_trainer_supplied_keys_point_to_training_arguments(key, hint):
    with pytest.raises(ValueError, match=f"Unknown optim_args key '{key}'.*{hint}"):
        parse_optim_args(f"{key}=0.1", _Probe, "probe")


def test_fixed_key_is_refused():
    with pytest.raises(ValueError, match="optim='probe' fixes momentum='ema'"):
        parse_optim_args("momentum=counts", _Probe, "probe", fixed={"momentum": "ema"})


@pytest.mark.parametrize(
    "text", ["window_size", "window_size=1=2", "window_size=1,", ",window_size=1", "window_size=", "=1", "a=1;b=2"]
)
def test_malformed_strings(text):
    with pytest.raises(ValueError, match="Malformed optim_args"):
        parse_optim_args(text, _Probe, "probe")


def test_repeated_key():
    with pytest.raises(ValueError, match="key 'beta1' is given more than once"):
        split_optim_args("beta1=0.9,beta1=0.8")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("window_size=1.5", "window_size='1.5' is not a valid int"),
        ("window_size=abc", "window_size='abc' is not a valid int"),
        ("threshold=high", "threshold='high' is not a valid float"),
        ("nesterov=maybe", "nesterov='maybe' is not a valid bool"),
        ("momentum=adam", "momentum='adam' is not a valid 'counts' | 'ema'"),
        ("beta1=x", "beta1='x' is not a valid float"),
        ("foreach=2", "foreach='2' is not a valid bool | None"),
    ],
)
def test_wrong_types(text, message):
    with pytest.raises(ValueError, match=message):
        parse_optim_args(text, _Probe, "probe")


@pytest.mark.parametrize(
    ("name", "expected_keys"),
    [
        ("lion", {"beta1", "beta2"}),
        ("signum", {"momentum"}),
        ("signmomentum", {"momentum"}),
        ("simba", {"window_size", "threshold", "momentum", "beta"}),
    ],
)
def test_sign_optimizer_keys(name, expected_keys):
    cls, fixed = SIGN_OPTIMIZERS[name]
    keys = set(optim_arg_specs(cls, fixed))
    assert expected_keys <= keys
    assert not keys & {"lr", "weight_decay", "params", "betas"}


def test_signsgd_has_no_momentum_key():
    cls, fixed = SIGN_OPTIMIZERS["signsgd"]
    assert fixed == {"momentum": 0.0}
    assert "momentum" not in optim_arg_specs(cls, fixed)
    with pytest.raises(ValueError, match="optim='signsgd' fixes momentum=0.0"):
        parse_optim_args("momentum=0.9", cls, "signsgd", fixed)


def test_simba_args_parse_to_its_types():
    cls, fixed = SIGN_OPTIMIZERS["simba"]
    kwargs = parse_optim_args("window_size=64,threshold=0.2,momentum=ema,beta=0.9", cls, "simba", fixed)
    assert kwargs == {"window_size": 64, "threshold": 0.2, "momentum": "ema", "beta": 0.9}
    assert type(kwargs["window_size"]) is int
