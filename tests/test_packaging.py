"""`pip install .` and `pip install -e .` in fresh venvs give `lmt` and the `lmt.*` packages,
and no bare top-level `agent`, `control` or `drivers` module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["lmt.agent", "lmt.drivers", "lmt.control", "lmt.analytics", "lmt.firmware_sim",
            "lmt.config"]

PROBE = f"""
import importlib.util, json, sys
import lmt.agent, lmt.drivers, lmt.control, lmt.analytics, lmt.firmware_sim, lmt.config
from lmt.config import load_profile
out = {{m: importlib.util.find_spec(m).origin for m in {PACKAGES!r}}}
out["bare"] = [m for m in ("agent", "control", "drivers", "firmware_sim", "config")
               if importlib.util.find_spec(m) is not None]
out["profile"] = load_profile("eastron-sdm630").id
print(json.dumps(out))
"""


def _install(tmp: Path, editable: bool) -> Path:
    env_dir = tmp / ("venv-e" if editable else "venv")
    # a fresh venv without its own pip (ensurepip alone takes seconds): this test
    # environment's pip installs into it (`pip --python`), with the usual isolated build
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    if editable:
        target = ["-e", str(ROOT)]
    else:  # build from a copy, so no build/ folder lands in (or is reused from) the checkout
        src = tmp / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache",
            "typecheck"))
        target = [str(src)]
    # --no-deps: the dependencies come from the test environment below; what is under test
    # is what this project's own packaging puts in place.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", *target], check=True, cwd=tmp, capture_output=True, timeout=300)
    return env_dir


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Future[Path]]:
    """Both installs, each into its own fresh venv, built at the same time (pip spends most of
    each one building the wheel in its isolated environment)."""
    with ThreadPoolExecutor(2) as pool:
        futures = {editable: pool.submit(_install, tmp_path_factory.mktemp("pkg"), editable)
                   for editable in (False, True)}
    return futures


def _probe(env_dir: Path, tmp: Path) -> dict:
    deps = sysconfig.get_paths()["purelib"]
    env = dict(os.environ, PYTHONPATH=deps)
    res = subprocess.run([str(env_dir / "bin" / "python"), "-c", PROBE], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    help_ = subprocess.run([str(env_dir / "bin" / "lmt"), "--help"], cwd=tmp, env=env,
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0, help_.stderr
    assert "platform" in help_.stdout and "run" in help_.stdout
    return json.loads(res.stdout)


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs to run from a virtualenv")
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_install_gives_lmt_namespace_only(installs: dict[bool, Future[Path]],
                                          editable: bool) -> None:
    env_dir = installs[editable].result()  # its own install's error, if it failed
    got = _probe(env_dir, env_dir.parent)
    assert got.pop("bare") == []
    assert got.pop("profile") == "eastron-sdm630"
    for mod, origin in got.items():
        folder = mod.split(".")[1]
        if editable:
            assert Path(origin).parent == ROOT / folder, (mod, origin)
        else:
            assert str(env_dir) in origin and "/lmt/" in origin, (mod, origin)
    if not editable:
        site = Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)}
                                        )["purelib"])
        assert not any((site / m).exists() for m in ("agent", "control", "drivers"))
        assert (site / "lmt" / "config" / "profile_library" / "generic-relay-8.toml").is_file()
        # the module lmt.config.profiles is the only thing of that name
        assert not (site / "lmt" / "config" / "profiles").exists()
