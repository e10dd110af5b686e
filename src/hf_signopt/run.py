"""Run an unmodified training script with hf_signopt's optimizer names registered.

Usage::

    python -m hf_signopt.run SCRIPT.py [SCRIPT ARGS...]
    python -m hf_signopt.run -m PACKAGE.MODULE [MODULE ARGS...]
    accelerate launch [ACCELERATE ARGS...] -m hf_signopt.run SCRIPT.py [SCRIPT ARGS...]
    torchrun [TORCHRUN ARGS...] -m hf_signopt.run SCRIPT.py [SCRIPT ARGS...]

The launcher imports `hf_signopt` (which registers `lion`, `signum`, `signsgd`, `signmomentum` and `simba` as
`TrainingArguments(optim=...)` names) and then runs the script as `__main__` with `sys.argv` set to the
script and its own arguments, exactly as `python SCRIPT.py ARGS...` would. When the script returns and left a
`torch.distributed` process group initialized (a `Trainer` under `torchrun` or `accelerate launch` does), every rank
meets at a barrier and frees it, so that no rank exits while gloo's threads still run (which can abort it with
"terminate called without an active exception" after a successful run).
"""

from __future__ import annotations

import os
import runpy
import sys


__all__ = ["end_processes", "main"]

_USAGE = (
    "usage: python -m hf_signopt.run SCRIPT.py [ARGS...]\n"
    "       python -m hf_signopt.run -m PACKAGE.MODULE [ARGS...]\n"
    "Registers hf_signopt's optimizers (--optim lion | signum | signsgd | signmomentum | simba), then runs the "
    "script with ARGS."
)


def main(argv: list[str] | None = None) -> None:
    """Registers hf_signopt with transformers, then runs a script or module as `__main__`.

    Args:
        argv: `[SCRIPT, *ARGS]` or `["-m", MODULE, *ARGS]`; defaults to `sys.argv[1:]`.

    Raises:
        SystemExit: With status 2 and a usage message if no script is given or the script does not exist;
            otherwise whatever the script raises, including its own `SystemExit`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(2 if not argv else 0)

    import hf_signopt  # noqa: F401  (registers the optimizer names)

    if argv[0] == "-m":
        if len(argv) < 2:
            print(f"hf_signopt.run: -m needs a module name\n{_USAGE}", file=sys.stderr)
            raise SystemExit(2)
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        script = argv[0]
        if not os.path.isfile(script):
            print(f"hf_signopt.run: no such script: {script!r}\n{_USAGE}", file=sys.stderr)
            raise SystemExit(2)
        sys.argv = [script, *argv[1:]]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
    end_processes()


def end_processes() -> None:
    """At the end of a script: every process meets at a barrier, then frees the default process group, if one is
    initialized (a rank that exits with gloo's threads still running can abort). Call it on every rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
