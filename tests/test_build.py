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


def _pip(*args, cwd, python=None):
    """pip install ARGS with a compiler that always fails (into `python`'s environment when given)."""
    env = {**os.environ, "CXX": "false", "CC": "false", "MAX_JOBS": "1"}
    where = ["--python", str(python)] if python else []
    return subprocess.run([sys.executable, "-m", "pip", *where, "--disable-pip-version-check", "install", "-v",
                           "--no-build-isolation", "--no-deps", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _venv(folder):
    """A venv that sees this environment's packages (torch, setuptools, ...) through a .pth line, but not dinm's
    own installation (its editable-install hook is a .pth of this environment, which a plain path line does not
    run), and that pip treats as another environment (it never uninstalls anything here)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    here = next(p for p in sys.path if p.endswith("site-packages"))
    (site,) = (folder / "lib").glob("python*/site-packages")
    (site / "parent.pth").write_text(here + "\n")
    return folder / "bin" / "python"


def _backend(python, path) -> str:
    """`dinm.ops.backend()` of the dinm installed at `path` (checked to be the one imported)."""
    code = "import dinm.ops; print(dinm.ops.__file__); print(dinm.ops.backend())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(python), "-c", code], env={**env, "PYTHONPATH": str(path)}, cwd="/",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    where, backend = out.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(path)), f"imported {where}, not the dinm installed at {path}"
    return backend


@pytest.mark.parametrize("editable", [False, True])
def test_a_failed_build_still_installs_and_runs_the_twin(source, tmp_path, editable):
    python = _venv(tmp_path / "venv")
    if editable:  # the source tree itself is imported: nothing may be copied into it that was not built
        result = _pip("-e", str(source), cwd=tmp_path, python=python)
        where = source
    else:
        where = tmp_path / "site"
        result = _pip("--target", str(where), str(source), cwd=tmp_path, python=python)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "the C++ extension was not built" in log
    assert not list((where / "dinm").glob("_C*.so"))
    backend = _backend(python, where)
    assert backend.startswith("twin (not built"), backend


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_cuda_build_checks_the_disk_before_pip_writes_anything(tmp_path):
    """`make cuda-room` (what `make cuda-build` runs first, and what `.ci/run` asks before it) refuses in one line
    naming the folder when the disk lacks `CUDA_MIN_FREE_GIB`, creates no venv, and passes when there is room."""
    venv = tmp_path / "deep" / ".venv-cuda"

    def room(gib):
        return subprocess.run(["make", "-s", "-C", ROOT, "cuda-room", f"CUDA_VENV={venv}",
                               f"CUDA_MIN_FREE_GIB={gib}"], capture_output=True, text=True)

    refused = room(10 ** 9)  # (an exbibyte: no disk has it)
    assert refused.returncode != 0
    line = refused.stdout.strip()
    assert "\n" not in line and f"under {venv.parent}/" in line and "needs about 1000000000 GiB" in line, line
    assert not venv.exists()
    assert room(0).returncode == 0, room(0).stdout + room(0).stderr
    assert not venv.exists()
