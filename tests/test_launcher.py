"""`python -m hf_signopt.run`: runs an unmodified training script with hf_signopt's optimizer names registered."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_signopt.run import main


REPO_ROOT = Path(__file__).resolve().parents[1]

# An unmodified HF-style training script: it never imports hf_signopt.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys

    import torch
    from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8,
    ))
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 16, (16, 8))]
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    group = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    result = "RESULT " + json.dumps({
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "group": group, "steps": trainer.state.global_step, "argv": sys.argv[1:3], "name": __name__,
    }) + "\\n"
    # One write of under PIPE_BUF bytes: under torchrun the ranks share this pipe, and a single such write to a
    # pipe is atomic, so the ranks' lines cannot interleave (print may split a line across writes).
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), result.encode())
    """
)

SIMBA_ARGS = ["--optim", "simba", "--optim_args", "window_size=64,threshold=0.2", "--learning_rate", "0.01",
              "--max_steps", "2", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
              "--save_strategy", "no"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _run(command, cwd):
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _result(completed):
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, completed.stdout[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def _check_simba_run(result, output_dir):
    assert result["optimizer"].startswith("hf_signopt.optim") and result["optimizer"].endswith(".Simba")
    assert result["group"]["window_size"] == 64 and result["group"]["threshold"] == 0.2
    assert result["group"]["initial_lr"] == 0.01  # the learning-rate schedule starts from --learning_rate
    assert result["steps"] == 2 and result["name"] == "__main__"
    assert result["argv"] == ["--output_dir", str(output_dir)]


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train_unmodified.py"
    path.write_text(TRAIN_SCRIPT)
    return path


@pytest.mark.e2e
def test_launcher_runs_an_unmodified_script(tmp_path, script):
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "hf_signopt.run", str(script), "--output_dir", str(output_dir), *SIMBA_ARGS]
    _check_simba_run(_result(_run(command, cwd=tmp_path)), output_dir)


@pytest.mark.e2e
def test_accelerate_launch(tmp_path, script):
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "hf_signopt.run", str(script), "--output_dir", str(output_dir), *SIMBA_ARGS]
    _check_simba_run(_result(_run(command, cwd=tmp_path)), output_dir)


@pytest.mark.multiprocess
def test_torchrun_ddp_runs_an_unmodified_script_and_leaves_cleanly(tmp_path, script):
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               "-m", "hf_signopt.run", str(script), "--output_dir", str(output_dir), *SIMBA_ARGS,
               "--ddp_backend", "gloo"]
    completed = _run(command, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "terminate called" not in completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 2, completed.stdout[-3000:]  # one per rank
    for line in lines:
        _check_simba_run(json.loads(line[len("RESULT "):]), output_dir)


PROBE = (
    "import sys\n"
    "from transformers.training_args import OptimizerNames\n"
    "print(__name__, sys.argv, OptimizerNames('signsgd').value)\n"
)


@pytest.fixture
def isolated_sys(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))


def test_script_gets_its_argv_and_runs_as_main(tmp_path, capsys, isolated_sys):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    main([str(probe), "--optim", "signsgd", "x y"])
    assert capsys.readouterr().out.strip() == f"__main__ {[str(probe), '--optim', 'signsgd', 'x y']} signsgd"
    assert sys.path[0] == str(tmp_path)  # like `python probe.py`: the script's folder comes first


def test_module_gets_its_argv_and_runs_as_main(tmp_path, capsys, isolated_sys):
    (tmp_path / "probe_module.py").write_text(PROBE)
    sys.path.insert(0, str(tmp_path))
    main(["-m", "probe_module", "--optim", "signsgd"])
    argv = [str(tmp_path / "probe_module.py"), "--optim", "signsgd"]  # like `python -m probe_module`
    assert capsys.readouterr().out.strip() == f"__main__ {argv} signsgd"


def test_process_group_left_by_the_script_is_freed(tmp_path, isolated_sys):
    import torch.distributed as dist

    script = tmp_path / "distributed.py"
    script.write_text(
        "import torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method={(tmp_path / 'rendezvous').as_uri()!r}, rank=0, world_size=1)\n"
    )
    main([str(script)])
    assert not dist.is_initialized()


def test_script_exit_status_propagates(tmp_path, isolated_sys):
    failing = tmp_path / "failing.py"
    failing.write_text("raise SystemExit(3)\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(failing)])
    assert exit_info.value.code == 3


@pytest.mark.parametrize(("argv", "status"), [([], 2), (["-m"], 2), (["no_such_script.py"], 2), (["--help"], 0)])
def test_usage_errors(argv, status, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == status
    assert "usage: python -m hf_signopt.run" in "".join(capsys.readouterr())


# As run_clm.py does with --model_type: the config comes from AutoConfig.for_model, the model from_config.
MOE_SCRIPT = textwrap.dedent(
    """
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments

    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "lossfree_moe", vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=8, router_bias_update_rate=0.01, router_bias_update_rule="sign",
    )
    model = AutoModelForCausalLM.from_config(config)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 16, (16, 8))]
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    biases = [m.e_score_correction_bias.tolist() for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    logged = [entry["moe/maxvio"] for entry in trainer.state.log_history if "moe/maxvio" in entry]
    print("RESULT " + json.dumps({"biases": biases, "maxvio": logged, "steps": trainer.state.global_step}))
    """
)


@pytest.mark.e2e
def test_unmodified_script_balances_a_lossfree_moe(tmp_path):
    """The issue's report: every saved bias stayed zero. Now each step moves each bias by exactly +-0.01 or 0."""
    script = tmp_path / "train_moe_unmodified.py"
    script.write_text(MOE_SCRIPT)
    command = [sys.executable, "-m", "hf_signopt.run", str(script), "--output_dir", str(tmp_path / "out"),
               *SIMBA_ARGS, "--logging_steps", "1"]
    result = _result(_run(command, cwd=tmp_path))
    assert result["steps"] == 2 and len(result["biases"]) == 2 and len(result["maxvio"]) == 2  # one log a step
    values = [value for bias in result["biases"] for value in bias]
    assert any(value != 0 for value in values)  # a step's update can undo the previous one, not all of them
    assert all(abs(abs(value) / 0.01 - round(abs(value) / 0.01)) < 1e-4 and abs(value) <= 0.02 + 1e-7
               for value in values)
