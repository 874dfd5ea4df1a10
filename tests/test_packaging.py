"""What the build and the sdist promise, checked on the checkout's own files: the build
requirements, the build switches of setup.py, the sdist's contents, and the types a user's
type checker sees."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(requirements: list[str]) -> dict:
    from packaging.requirements import Requirement

    return {req.name: req for req in map(Requirement, requirements)}


def _floor(requirements: list[str], name: str) -> tuple[int, ...]:
    req = _requirements(requirements)[name]
    (low,) = [s.version for s in req.specifier if s.operator == ">="]
    return tuple(int(part) for part in low.split("."))


def test_the_build_needs_the_numpy_the_package_runs_with() -> None:
    """_allocator cimports numpy's C API: built against numpy 1.x headers it fails to import
    under numpy 2 ("numpy.dtype size changed"), the only numpy the package allows."""
    data = _pyproject()
    build = _floor(data["build-system"]["requires"], "numpy")
    assert build >= _floor(data["project"]["dependencies"], "numpy")


def test_the_build_does_not_require_the_wheel_package() -> None:
    """setuptools >= 70.1 builds wheels itself; requiring `wheel` too only fails an offline
    `python -m build --no-isolation` where it is not installed."""
    requires = _pyproject()["build-system"]["requires"]
    assert _floor(requires, "setuptools") >= (70, 1)
    assert "wheel" not in _requirements(requires)


def test_check_sdist_requires_the_ci_scripts_ci_run_runs(tmp_path: Path) -> None:
    """The sdist ships .ci/run, whose last step is `bash .ci/newer-pythons`: an sdist
    without it fails there, and .ci/check_sdist.py (run by CI on the built sdist) says so."""
    import tarfile

    tree = tmp_path / "pymllm-0"
    for pattern in ("pyx/**/*.pyx", "pyx/**/*.pxd", "tests/*.py", "bench/*.py", ".ci/*"):
        for p in ROOT.glob(pattern):
            if p.is_file() and p.name != "newer-pythons":
                dst = tree / p.relative_to(ROOT)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, dst)
    for name in ("py.typed", "mem_cache/py.typed", "mem_cache/_radix_tree.pyi"):
        (tree / "pymllm" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "pymllm" / name, tree / "pymllm" / name)
    shutil.copy(ROOT / "pymllm/mem_cache/_allocator.pyi", tree / "pymllm/mem_cache")
    sdist = tmp_path / "pymllm-0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tree, arcname="pymllm-0")
    run = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "check_sdist.py"), str(sdist)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == ["check_sdist: missing .ci/newer-pythons"]


def test_the_lazily_loaded_device_pools_are_typed(tmp_path: Path) -> None:
    """pymllm.mem_cache loads the JAX pools on first use (module __getattr__); a type
    checker must still see their types, not Any, as it does the tree's. mypy runs in a
    child: run in this process it kept about 1.8 million objects alive, which made every
    later full collection in the suite take seconds."""
    pytest.importorskip("mypy")
    user = tmp_path / "user.py"
    user.write_text(
        "from pymllm.mem_cache import KVPool, MambaPool, ReqToTokenPool\n"
        "from pymllm.mem_cache import make_full_attention_net_mem_pool, make_req_to_token_pool\n"
        "reveal_type(KVPool)\nreveal_type(MambaPool)\nreveal_type(ReqToTokenPool)\n"
        "reveal_type(make_full_attention_net_mem_pool)\nreveal_type(make_req_to_token_pool)\n"
    )
    import pymllm

    root = Path(pymllm.__file__).resolve().parents[1]  # a checkout built in place, or
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}  # site-packages, where
    if root.name != "site-packages":  # mypy finds it by itself
        env["MYPYPATH"] = str(root)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            str(user),
            "--no-incremental",
            "--cache-dir",
            os.devnull,
            "--config-file",
            os.devnull,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    revealed = [line for line in run.stdout.splitlines() if "Revealed type" in line]
    assert len(revealed) == 5, run.stdout + run.stderr
    assert not [line for line in revealed if line.endswith('"Any"')], run.stdout


def _buildable_copy(dst: Path) -> Path:
    """The files a build reads, without any build product (.so, generated .c, build/)."""
    for name in ("setup.py", "setup.cfg", "pyproject.toml"):
        shutil.copy2(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__", "build")
    for name in ("pyx", "pymllm"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    return dst


_SWITCHES = ("PYMLLM_DEBUG", "PYMLLM_LINETRACE", "PYMLLM_SANITIZE")


def _setup_py(cwd: Path, *args: str, succeeds: bool = True, **env: str) -> None:
    """setup.py *args* in *cwd* for _allocator alone, with the build switches of *env* only
    (none inherited), succeeding or failing as *succeeds* says."""
    inherited = {k: v for k, v in os.environ.items() if k not in _SWITCHES}
    run = subprocess.run(
        [sys.executable, "setup.py", *args],
        cwd=cwd,
        env={**inherited, "PYTHONPATH": "", "PYMLLM_EXT_FILTER": "_allocator", **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert (run.returncode == 0) == succeeds, run.stderr[-3000:]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_build_switch_changed_after_a_build_rebuilds(tmp_path: Path) -> None:
    """setup.py's switches (PYMLLM_DEBUG=1: -O0 -g and bounds checks): cythonize and
    build_ext redo a build by timestamps only, so a switch set after a release build
    reused the release C and copied the release binary back without a word (and a wheel
    built later from that checkout shipped whatever build/ last held). Each switch change
    must regenerate the C and compile again; building again unchanged must not."""
    pytest.importorskip("Cython")
    work = _buildable_copy(tmp_path)
    c_file = work / "pyx" / "pymllm" / "mem_cache" / "_allocator.c"
    _setup_py(work, "build_ext", "--inplace", "-q")
    (so,) = (work / "pymllm" / "mem_cache").glob("_allocator*.so")
    release_c, release_so = c_file.read_text(), _digest(so)
    _setup_py(work, "build_ext", "--inplace", "-q")
    assert _digest(so) == release_so and c_file.read_text() == release_c
    _setup_py(work, "build_ext", "--inplace", "-q", PYMLLM_DEBUG="1")
    assert c_file.read_text() != release_c, "PYMLLM_DEBUG=1 kept the release build's C"
    assert _digest(so) != release_so, "PYMLLM_DEBUG=1 left the release binary in place"
    _setup_py(work, "build_ext", "--inplace", "-q")
    assert c_file.read_text() == release_c


def test_a_failed_build_leaves_no_stamp_naming_other_switches(tmp_path: Path) -> None:
    """setup.py's stamps name the switches each extension's generated C was made with. A
    release build after a debug one regenerates the C and then fails to compile (CC=false):
    the stamps must not still say debug, or the next debug build keeps the release C."""
    pytest.importorskip("Cython")
    work = _buildable_copy(tmp_path)
    debug = "debug=True linetrace=False sanitize=0"
    stamps = work / "build" / "pymllm-switches"
    stamps.mkdir(parents=True)
    (stamps / "pymllm.mem_cache._allocator").write_text(debug)  # a finished debug build
    _setup_py(work, "build_ext", "--inplace", succeeds=False, CC="false", LDSHARED="false")
    assert (work / "pyx" / "pymllm" / "mem_cache" / "_allocator.c").is_file()  # C regenerated
    stamp = stamps / "pymllm.mem_cache._allocator"
    assert not stamp.is_file() or stamp.read_text() != debug
