"""The compiled-kernel cache never loads a library that another user could have written.

A "planted" library here is a real shared library whose constructor creates a marker file as soon
as it is loaded; the tests check that the marker never appears and that the optimizer then runs the
real kernels, built (copied, for speed) into a private directory.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from hf_signopt import Lion
from hf_signopt.optim import _cpu_kernels

pytestmark = pytest.mark.skipif(_cpu_kernels.load(required=False) is None,
                                reason="no C++ compiler for the fused CPU kernel")

PLANTED_SOURCE = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *marker = fopen("%s", "w");
    if (marker) fclose(marker);
}
"""


@pytest.fixture(scope="module")
def real_library() -> Path:
    """The real kernels, already built by the module-level `load` above (its file name is the expected one)."""
    return Path(_cpu_kernels.load(required=True)._name)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    """A shared library whose constructor writes a marker file, and that marker's path."""
    where = tmp_path_factory.mktemp("planted")
    marker, source, library = where / "constructor-ran", where / "planted.cpp", where / "planted.so"
    source.write_text(PLANTED_SOURCE % marker)
    subprocess.run([shutil.which(os.environ.get("CXX", "c++")), "-shared", "-fPIC", str(source), "-o", str(library)],
                   check=True)
    # Positive control, in another process: loading it does run its constructor.
    subprocess.run([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1])", str(library)], check=True)
    assert marker.exists()
    marker.unlink()
    return library, marker


@pytest.fixture
def kernels(monkeypatch, tmp_path, real_library):
    """Forget the loaded library, isolate the cache and home directories, and "compile" by copying.

    Returns:
        A dict: ``cache`` (the configured cache, not created), ``home`` (not created) and
        ``compiled`` (the targets "compiled" so far).
    """
    monkeypatch.setattr(_cpu_kernels, "_library", None)
    monkeypatch.setattr(_cpu_kernels, "_failure", None)
    monkeypatch.setenv("HF_SIGNOPT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_SIGNOPT_TRITON_ON_CPU", raising=False)  # fused=True on CPU: these C++ kernels
    compiled = []

    def copy_real_library(compiler, flags, target):  # like `_compile`: a new file renamed over the target
        fresh = target.with_name(".copying")
        shutil.copyfile(real_library, fresh)
        os.chmod(fresh, 0o700)
        os.replace(fresh, target)
        compiled.append(target)

    monkeypatch.setattr(_cpu_kernels, "_compile", copy_real_library)
    return {"cache": tmp_path / "cache", "home": tmp_path / "home", "compiled": compiled}


def private_fallback(home: Path) -> Path:
    return home / ".cache" / "hf_signopt" / "kernels"


def plant(library: Path, directory: Path, name: str, mode: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    shutil.copyfile(library, target)
    os.chmod(target, mode)
    return target


def load_with_warnings(marker: Path | None = None) -> list[str]:
    """Load the kernels twice and take one fused step; return the warnings logged.

    Args:
        marker: Fail first of all if this file appears (a planted library was loaded).
    """
    try:
        with mock.patch.object(_cpu_kernels.logger, "warning") as warning:
            assert _cpu_kernels.load(required=True) is not None
            assert _cpu_kernels.load(required=True) is not None
            p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
            p.grad = torch.tensor([2.0, -3.0])
            Lion([p], lr=0.5, weight_decay=0.0, fused=True).step()
            assert p.tolist() == [0.5, -0.5]
    finally:
        ran = marker is not None and marker.exists()
        if ran:
            marker.unlink()  # let the other tests judge for themselves
        assert not ran, "the planted library was loaded: its constructor ran"
    assert hasattr(_cpu_kernels._library, "hfso_lion_float32")
    return [call.args[0] for call in warning.call_args_list]


def loaded_from() -> Path:
    return Path(_cpu_kernels._library._name)


def test_planted_library_in_world_writable_cache_is_not_loaded(kernels, planted, real_library):
    library, marker = planted
    shared = kernels["cache"]
    target = plant(library, shared, real_library.name, 0o755)
    shared.chmod(0o777)

    warnings = load_with_warnings(marker)

    assert loaded_from() == private_fallback(kernels["home"]) / real_library.name
    assert len(warnings) == 1
    assert f"not using the kernel cache {shared} because it is writable by group or others (mode 777)" in warnings[0]
    assert f"building the fused CPU kernels in {private_fallback(kernels['home'])} instead" in warnings[0]
    assert target.read_bytes() == library.read_bytes()  # someone else's file: left alone
    for path in (kernels["home"], kernels["home"] / ".cache", private_fallback(kernels["home"])):
        assert path.stat().st_mode & 0o777 == 0o700  # created private


def test_group_writable_library_in_a_safe_cache_is_rebuilt(kernels, planted, real_library):
    library, marker = planted
    target = plant(library, kernels["cache"], real_library.name, 0o775)
    kernels["cache"].chmod(0o700)

    warnings = load_with_warnings(marker)

    assert loaded_from() == target and kernels["compiled"] == [target]
    assert target.stat().st_mode & 0o777 == 0o700 and target.read_bytes() == real_library.read_bytes()
    assert len(warnings) == 1
    assert f"not loading the cached kernel library {target} because it is writable by group" in warnings[0]


def test_symlinked_library_is_rebuilt(kernels, planted, real_library, tmp_path):
    library, marker = planted
    elsewhere = plant(library, tmp_path / "elsewhere", "planted.so", 0o700)  # private, but not in the cache
    kernels["cache"].mkdir(mode=0o700)
    target = kernels["cache"] / real_library.name
    target.symlink_to(elsewhere)

    warnings = load_with_warnings(marker)

    assert not target.is_symlink() and loaded_from() == target
    assert elsewhere.read_bytes() == library.read_bytes()
    assert len(warnings) == 1 and "because it is a symbolic link" in warnings[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_library_owned_by_another_user_is_rebuilt(kernels, planted, real_library):
    library, marker = planted
    target = plant(library, kernels["cache"], real_library.name, 0o755)
    kernels["cache"].chmod(0o700)
    os.chown(target, 65534, 65534)

    warnings = load_with_warnings(marker)

    assert loaded_from() == target and target.stat().st_uid == os.geteuid()
    assert len(warnings) == 1 and "because it is owned by uid 65534, not by you" in warnings[0]


@pytest.mark.parametrize("sticky", [False, True], ids=["plain", "sticky"])
def test_world_writable_parent_is_refused_unless_sticky(kernels, monkeypatch, tmp_path, sticky):
    """Others could rename a cache out of a world-writable parent, but not out of a sticky one like /tmp."""
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o1777 if sticky else 0o777)
    cache = parent / "nested" / "cache"
    monkeypatch.setenv("HF_SIGNOPT_KERNEL_CACHE", str(cache))

    warnings = load_with_warnings()

    if sticky:
        assert warnings == [] and loaded_from() == cache / loaded_from().name
        assert cache.stat().st_mode & 0o777 == 0o700 and (parent / "nested").stat().st_mode & 0o777 == 0o700
    else:
        assert len(warnings) == 1
        assert f"its parent {parent} is writable by group or others without the sticky bit" in warnings[0]
        assert loaded_from().parent == private_fallback(kernels["home"])
        assert not (parent / "nested").exists()  # nothing created where it would be refused


def test_fallback_is_a_fresh_private_temporary_when_home_is_unsafe_too(kernels, monkeypatch, tmp_path):
    kernels["cache"].mkdir(mode=0o777)
    kernels["cache"].chmod(0o777)
    kernels["home"].mkdir()
    kernels["home"].chmod(0o777)
    monkeypatch.setattr(_cpu_kernels.tempfile, "tempdir", str(tmp_path))
    with mock.patch.object(_cpu_kernels.atexit, "register") as register:
        warnings = load_with_warnings()

    directory = loaded_from().parent
    assert directory.parent == tmp_path and directory.name.startswith("hf_signopt_kernels_")
    assert directory.stat().st_mode & 0o777 == 0o700
    register.assert_called_once_with(shutil.rmtree, str(directory), ignore_errors=True)  # removed at exit
    assert len(warnings) == 1 and f"building the fused CPU kernels in {directory} instead" in warnings[0]


def test_no_private_directory_at_all_means_the_foreach_path(kernels, monkeypatch, tmp_path, planted, real_library):
    library, marker = planted
    for directory in (kernels["cache"], kernels["home"], tmp_path / "tmp"):
        plant(library, directory, real_library.name, 0o755)
        directory.chmod(0o777)
    monkeypatch.setattr(_cpu_kernels.tempfile, "tempdir", str(tmp_path / "tmp"))
    with (mock.patch.object(_cpu_kernels.logger, "warning") as warning,
          mock.patch.object(_cpu_kernels.atexit, "register")):
        assert _cpu_kernels.load(required=False) is None
        assert _cpu_kernels.load(required=False) is None
    assert not marker.exists()
    assert warning.call_count == 1
    message = warning.call_args[0][0]
    assert "fused CPU kernels unavailable, using torch operations instead" in message
    assert f"not using the kernel cache {kernels['cache']} because it is writable by group or others" in message
    assert f"because its parent {tmp_path / 'tmp'} is writable by group or others without the sticky bit" in message


def test_symlinked_cache_directory_is_resolved_and_checked(kernels, monkeypatch, tmp_path):
    """A cache reached through a symlink (common on clusters) is fine if where it leads is private."""
    real = tmp_path / "scratch" / "cache"
    real.mkdir(parents=True, mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setenv("HF_SIGNOPT_KERNEL_CACHE", str(link))

    assert load_with_warnings() == []
    assert loaded_from().parent == real


def test_safe_cache_is_reused_without_compiling(kernels, real_library):
    target = plant(real_library, kernels["cache"], real_library.name, 0o755)
    kernels["cache"].chmod(0o700)

    assert load_with_warnings() == []
    assert loaded_from() == target and kernels["compiled"] == []
