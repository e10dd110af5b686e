"""The library needs only torch, transformers, accelerate and safetensors: what the recipes use is optional."""

import subprocess
import sys
import textwrap
from pathlib import Path

RECIPE_ONLY = ("datasets", "jinja2", "matplotlib")  # pyyaml comes with huggingface_hub, a transformers need

PROGRAM = textwrap.dedent(
    f"""
    import sys

    for name in {RECIPE_ONLY!r}:  # as if not installed: `import` raises, `importlib.util.find_spec` gives None
        sys.modules[name] = None
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import hf_signopt

    config = hf_signopt.LossFreeMoeConfig(
        vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=16,
    )
    model = AutoModelForCausalLM.from_config(config)
    balancer = hf_signopt.LossFreeBalancer(model)
    ids = torch.randint(0, 32, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    for optimizer in (hf_signopt.Lion, hf_signopt.Signum, hf_signopt.SignMomentum, hf_signopt.Simba):
        optimizer(model.parameters(), lr=1e-3).step()
    balancer.step()
    balancer.remove()
    args = TrainingArguments("unused", optim="simba", max_steps=1, report_to=[], use_cpu=True)
    Trainer(model=model, args=args, callbacks=[hf_signopt.LossFreeBalanceCallback()])
    loaded = [name for name, module in sys.modules.items()
              if module is not None and name.split(".")[0] in {RECIPE_ONLY!r}]
    assert not loaded, loaded
    print("lean core ok")
    """
)


def test_library_works_without_the_recipe_only_packages(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lean core ok" in done.stdout


def test_a_folder_named_like_the_package_does_not_shadow_it(tmp_path):
    """Python started beside a clone named `hf_signopt/` (no `__init__.py` at its top) still imports the package."""
    (tmp_path / "hf_signopt" / "tests").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", "import hf_signopt; print(hf_signopt.LossFreeMoeConfig.model_type)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "lossfree_moe"
