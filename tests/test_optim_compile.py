"""`torch.compile(opt.step, fullgraph=True)` on every optimizer's default path equals the eager step.

Eager takes the fused C++ kernel where it applies; the compiled step traces the foreach path. The two
evaluate the decoupled weight decay in a different order (``p*(1 - lr*wd) - lr*u`` against
``p - lr*(u + wd*p)``), about 1 ulp of |p| <= 4 (5e-7) per step, so 6 steps stay within 3e-6; the
update itself (a sign, or SignMomentum's ``m``) is equal, so no element takes a different direction.
"""

import pytest
import torch
from optim_cases import OPTIMIZERS

STEPS = 6
ATOL = 3e-6


def compiled_and_eager(name, lr, backend):
    cls, hparams = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(0)
    eager_params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (10, 300, 5)]
    compiled_params = [torch.nn.Parameter(p.detach().clone()) for p in eager_params]
    eager = cls(eager_params, lr=lr, weight_decay=0.1, **hparams)
    compiled = cls(compiled_params, lr=lr.clone() if isinstance(lr, torch.Tensor) else lr, weight_decay=0.1,
                   **hparams)
    torch._dynamo.reset()
    step = torch.compile(compiled.step, fullgraph=True, backend=backend)
    for _ in range(STEPS):
        for p, q in zip(eager_params, compiled_params):
            p.grad = torch.randn(p.shape, generator=gen) + 0.2
            q.grad = p.grad.clone()
        eager.step()
        step()
    return (eager_params, eager), (compiled_params, compiled)


def assert_close_runs(eager_run, compiled_run):
    (eager_params, eager), (compiled_params, compiled) = eager_run, compiled_run
    for p, q in zip(eager_params, compiled_params):
        torch.testing.assert_close(q, p, rtol=0, atol=ATOL)
        for key, value in eager.state[p].items():
            torch.testing.assert_close(compiled.state[q][key], value, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fullgraph_compiled_step_equals_eager(name):
    """aot_eager traces exactly what inductor gets (dynamo + AOT autograd) at a fraction of the compile time."""
    assert_close_runs(*compiled_and_eager(name, torch.tensor(0.02), backend="aot_eager"))


@pytest.mark.parametrize("name", ["lion", "simba"])
def test_inductor_compiled_step_equals_eager(name):
    assert_close_runs(*compiled_and_eager(name, 0.02, backend="inductor"))


def test_tensor_lr_changes_without_recompiling():
    """A scheduler writes a Tensor lr in place (``fill_``) and assigns a float one, which dynamo guards on."""
    from torch._dynamo.testing import CompileCounter

    cls, hparams = OPTIMIZERS["lion"]
    params = [torch.nn.Parameter(torch.randn(8))]
    compiles = []
    for lr in (torch.tensor(0.1), 0.1):
        opt = cls(params, lr=lr, **hparams)
        torch._dynamo.reset()
        counter = CompileCounter()
        step = torch.compile(opt.step, fullgraph=True, backend=counter)
        for value in (0.1, 0.05, 0.025):
            if isinstance(lr, torch.Tensor):
                opt.param_groups[0]["lr"].fill_(value)
            else:
                opt.param_groups[0]["lr"] = value
            params[0].grad = torch.ones(8)
            step()
        compiles.append(counter.frame_count)
    assert compiles[0] == 1 and compiles[1] > 1


def test_fused_true_is_refused_inside_compile():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.ones(4)
    opt = OPTIMIZERS["lion"][0]([p], fused=True)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="fused=True kernels cannot be traced by torch.compile"):
        torch.compile(opt.step, fullgraph=True, backend="eager")()


def test_fullgraph_step_of_a_self_balancing_model():
    """The balancer's global step hook stays out of compiled steps: the step compiles whole and leaves the biases;
    the update is the caller's (`balancer.step()`, or the Trainer's callback)."""
    from moe_tiny import TINY_MOE

    import hf_signopt
    from hf_signopt import LossFreeMoeConfig, LossFreeMoeForCausalLM

    model = LossFreeMoeForCausalLM(LossFreeMoeConfig(**TINY_MOE))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt = OPTIMIZERS["lion"][0](model.parameters(), lr=torch.tensor(1e-3))
    torch._dynamo.reset()
    torch.compile(opt.step, fullgraph=True, backend="eager")()
    biases = [m.e_score_correction_bias for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    assert all(b.abs().max() == 0 for b in biases)
    hf_signopt.attached_balancer(model).step()
    assert any(b.abs().max() > 0 for b in biases)
