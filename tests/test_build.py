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
    """`make cuda-build` (and `make cuda-room`, what `.ci/run` asks before it) refuses in one line naming the folder
    when the disk lacks `CUDA_MIN_FREE_GIB`, before it makes the venv; a check that cannot compare (a bad number)
    says so instead of blaming the disk, which `.ci/run` would skip on; a venv stamped with the torch it holds
    needs no room."""
    venv = tmp_path / "deep" / ".venv-cuda"
    fake = tmp_path / "bin"  # an nvcc that does nothing: cuda-build checks the toolkit first, then the room
    fake.mkdir()
    (fake / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    (fake / "nvcc").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}

    def make(target, gib):
        return subprocess.run(["make", "-s", "--no-print-directory", "-C", ROOT, target, f"CUDA_VENV={venv}",
                               f"CUDA_MIN_FREE_GIB={gib}", "CUDA_TORCH=torch==2.14.1",
                               "PYTHON=false"],  # (were the check skipped, making the venv fails at once)
                              capture_output=True, text=True, env=env)

    for target in ("cuda-room", "cuda-build"):
        refused = make(target, 10 ** 9)  # (about an exbibyte: no disk has it)
        assert refused.returncode != 0
        line = refused.stdout.strip()
        assert "\n" not in line and f"GiB free under {venv.parent}/" in line, line
        assert "needs about 1000000000 GiB" in line, line
        assert not venv.exists()
    garbled = make("cuda-room", "ten")
    assert garbled.returncode != 0 and "GiB free under" not in garbled.stdout, garbled.stdout
    assert "CUDA_MIN_FREE_GIB='ten'" in garbled.stdout, garbled.stdout
    assert make("cuda-room", 0).returncode == 0
    venv.mkdir()
    (venv / ".dinm-torch").write_text("torch==0.0.1\n")  # another torch than the one asked for: checked
    assert make("cuda-room", 10 ** 9).returncode != 0
    (venv / ".dinm-torch").write_text("torch==2.14.1\n")  # what CUDA_TORCH asks for, installed: no room needed
    assert make("cuda-room", 10 ** 9).returncode == 0
