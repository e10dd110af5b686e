"""Every hyperparameter and input check of the sign optimizers: the message names value and range."""

import re

import pytest
import torch

from hf_signopt import Lion, SignMomentum, Signum, Simba


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


ALL = [Lion, Signum, SignMomentum, Simba]

BAD_VALUES = [
    # (optimizer, kwargs, exception, message fragments)
    *[(cls, dict(lr=-1e-3), ValueError, ["-0.001", "[0, inf)"]) for cls in ALL],
    *[(cls, dict(lr=float("inf")), ValueError, ["inf", "[0, inf)"]) for cls in ALL],
    *[(cls, dict(lr=float("nan")), ValueError, ["nan", "[0, inf)"]) for cls in ALL],
    *[(cls, dict(lr="1e-3"), TypeError, ["lr", "'1e-3'"]) for cls in ALL],
    *[(cls, dict(weight_decay=-0.1), ValueError, ["weight_decay", "-0.1", "[0, inf)"]) for cls in ALL],
    *[(cls, dict(foreach="yes"), TypeError, ["foreach", "'yes'"]) for cls in ALL],
    *[(cls, dict(fused=1), TypeError, ["fused", "1"]) for cls in ALL],
    *[(cls, dict(foreach=True, fused=True), ValueError, ["mutually exclusive"]) for cls in ALL],
    *[(cls, dict(nonfinite_check_interval=-1), ValueError, ["nonfinite_check_interval", "-1", "[0,"])
      for cls in ALL],
    (Lion, dict(betas=(1.0, 0.99)), ValueError, ["betas[0]", "1.0", "[0, 1)"]),
    (Lion, dict(betas=(0.9, -0.01)), ValueError, ["betas[1]", "-0.01", "[0, 1)"]),
    (Lion, dict(betas=(0.9,)), ValueError, ["betas", "(0.9,)", "pair"]),
    (Lion, dict(betas=0.9), ValueError, ["betas", "0.9", "pair"]),
    *[(cls, dict(momentum=1.0), ValueError, ["momentum", "1.0", "[0, 1)"]) for cls in (Signum, SignMomentum)],
    *[(cls, dict(momentum=-0.5), ValueError, ["momentum", "-0.5", "[0, 1)"]) for cls in (Signum, SignMomentum)],
    (Simba, dict(window_size=0), ValueError, ["window_size", "0", "[1, 32767]"]),
    (Simba, dict(window_size=32768), ValueError, ["window_size", "32768", "[1, 32767]"]),
    (Simba, dict(window_size=12.0), TypeError, ["window_size", "12.0", "integer"]),
    (Simba, dict(window_size=True), TypeError, ["window_size", "True", "integer"]),
    (Simba, dict(threshold=-0.1), ValueError, ["threshold", "-0.1", "[0, 1]"]),
    (Simba, dict(threshold=1.5), ValueError, ["threshold", "1.5", "[0, 1]"]),
    (Simba, dict(momentum="adam"), ValueError, ["momentum", "'adam'", "'counts', 'ema'"]),
    (Simba, dict(beta=1.0), ValueError, ["beta", "1.0", "[0, 1)"]),
    (Simba, dict(beta=-0.2), ValueError, ["beta", "-0.2", "[0, 1)"]),
]


@pytest.mark.parametrize(
    "cls,kwargs,error,fragments", BAD_VALUES, ids=[f"{c.__name__}-{k}" for c, k, _, _ in BAD_VALUES]
)
def test_bad_hyperparameter_is_refused(cls, kwargs, error, fragments):
    with pytest.raises(error) as info:
        cls(params(), **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("cls", ALL)
def test_bad_value_in_a_param_group_is_refused(cls):
    with pytest.raises(ValueError, match=re.escape("-2.0")):
        cls([{"params": params()}, {"params": params(), "lr": -2.0}])
    opt = cls(params())
    with pytest.raises(ValueError, match=re.escape("[0, inf)")):
        opt.add_param_group({"params": params(), "weight_decay": -1.0})


@pytest.mark.parametrize("cls", ALL)
def test_boundary_values_are_accepted(cls):
    extra = {Lion: dict(betas=(0.0, 0.0)), Signum: dict(momentum=0.0), SignMomentum: dict(momentum=0.0),
             Simba: dict(window_size=1, threshold=1.0, beta=0.0)}[cls]
    cls(params(), lr=0.0, weight_decay=0.0, nonfinite_check_interval=0, **extra)
    if cls is Simba:
        Simba(params(), window_size=32767, threshold=0.0, momentum="ema")


@pytest.mark.parametrize("cls", ALL)
def test_sparse_parameter_is_refused(cls):
    sparse = torch.nn.Parameter(torch.zeros(3, 3).to_sparse())
    with pytest.raises(ValueError, match="dense parameters"):
        cls([sparse])


@pytest.mark.parametrize("cls", ALL)
def test_complex_parameter_is_refused(cls):
    with pytest.raises(ValueError, match="complex parameters.*complex64"):
        cls([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])


@pytest.mark.parametrize("cls", ALL)
def test_integer_parameter_is_refused(cls):
    with pytest.raises(ValueError, match="floating-point parameters.*int64"):
        cls([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("cls", ALL)
def test_sparse_gradient_is_refused(cls):
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = cls(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()
    assert torch.equal(embedding.weight, before)


@pytest.mark.parametrize("cls", ALL)
def test_fused_refuses_unsupported_dtype(cls):
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="fused=True supports CPU parameters of dtype float32 or bfloat16.*float64"):
        cls([p], fused=True)


@pytest.mark.parametrize("cls", ALL)
def test_sparse_gradient_in_a_later_group_changes_nothing(cls):
    dense = torch.nn.Parameter(torch.ones(3))
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = cls([{"params": [dense]}, {"params": embedding.parameters()}], lr=0.1)
    dense.grad = torch.ones(3)
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()
    assert dense.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("cls", ALL)
def test_loaded_state_dict_with_bad_hyperparameter_is_refused(cls):
    opt = cls(params())
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match=re.escape("-1.0")):
        cls(params()).load_state_dict(state)
