"""A failed C++ build never fails the install: editable or not, dinm installs and runs its PyTorch twin, and
`dinm.ops.backend()` says why. The build is made to fail for real: the compiler is `false`."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the sources, without any built extension."""
    src = tmp_path_factory.mktemp("build") / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    for folder in ("csrc", "dinm", "cli"):
        shutil.copytree(os.path.join(ROOT, folder), src / folder,
                        ignore=shutil.ignore_patterns("_C*.so", "__pycache__", "build"))
    return src


def _pip(*args, cwd):
    env = {**os.environ, "CXX": "false", "CC": "false", "MAX_JOBS": "1"}
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "-v",
                           "--no-build-isolation", "--no-deps", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _backend(path) -> str:
    code = "import dinm.ops; print(dinm.ops.backend())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(path)}, cwd="/",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("editable", [False, True])
def test_a_failed_build_still_installs_and_runs_the_twin(source, tmp_path, editable):
    target = tmp_path / "site"
    if editable:  # the source tree itself is imported: nothing may be copied into it that was not built
        result = _pip("--prefix", str(tmp_path / "prefix"), "-e", str(source), cwd=tmp_path)
        where = source
    else:
        result = _pip("--target", str(target), str(source), cwd=tmp_path)
        where = target
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "the C++ extension was not built" in log
    assert not list((where / "dinm").glob("_C*.so"))
    backend = _backend(where)
    assert backend.startswith("twin (not built"), backend
