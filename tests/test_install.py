"""The package as people install it: ``python -m build`` makes an sdist and a
wheel, and the wheel works in a fresh venv holding only its required
dependencies, away from the source tree.

Marked ``wheel``: ``pytest -m wheel`` runs it alone, ``-m "not wheel"`` skips it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = os.environ.get("LAYERFREEZE_TEST_TORCH", "torch==2.13.0")

pytestmark = pytest.mark.wheel


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str], str]:
    pytest.importorskip("build")
    work = tmp_path_factory.mktemp("install")
    source = work / "source"  # a copy, so the build leaves nothing in the working tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    dist = work / "dist"
    built = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)], work, env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    log = built.stdout + built.stderr
    assert "Deprecat" not in log, log[-3000:]
    (wheel,) = dist.glob("layerfreeze-*.whl")
    assert len(list(dist.glob("layerfreeze-*.tar.gz"))) == 1

    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], work, env)
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    pip = _run([str(py), "-m", "pip", "install", "-q", TORCH, str(wheel)], work, env, timeout=600)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    away = work / "elsewhere"  # no source tree in sight
    away.mkdir()
    return venv, away, env, wheel.name


def test_wheel_holds_the_package_data(installed: tuple[Path, Path, dict[str, str], str]) -> None:
    venv, away, _, name = installed
    with zipfile.ZipFile(next((away.parent / "dist").glob(name))) as whl:
        names = set(whl.namelist())
    for needed in ("layerfreeze/py.typed", "layerfreeze/demos/seed.py", "layerfreeze/demos/encoder.py",
                   "layerfreeze/cli.py"):
        assert needed in names, sorted(names)
    meta = next(n for n in names if n.endswith("/METADATA"))
    with zipfile.ZipFile(next((away.parent / "dist").glob(name))) as whl:
        text = whl.read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    assert "Requires-Dist: rich" in text


def test_import_version_and_demo_work_from_the_wheel(installed: tuple[Path, Path, dict[str, str], str]) -> None:
    venv, away, env, _ = installed
    py, cli = str(venv / "bin" / "python"), str(venv / "bin" / "layerfreeze")
    imported = _run([py, "-c", "import sys, layerfreeze; print(layerfreeze.__file__); print('rich' in sys.modules)"],
                    away, env)
    assert imported.returncode == 0, imported.stderr
    where, rich_loaded = imported.stdout.split()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT)
    assert rich_loaded == "False"  # import layerfreeze needs torch alone
    version = _run([cli, "--version"], away, env)
    assert (version.returncode, version.stdout.strip()) == (0, "layerfreeze 0.1.0")
    demo = _run([cli, "demo"], away, env)
    assert demo.returncode == 0, demo.stderr
    assert "trainable params: 73" in demo.stdout and demo.stdout.count("ok: ") == 4
    assert list(away.iterdir()) == []  # the demo wrote nothing into the current folder


def test_missing_extras_are_errors_that_name_the_extra(installed: tuple[Path, Path, dict[str, str], str]) -> None:
    venv, away, env, _ = installed
    py, cli = str(venv / "bin" / "python"), str(venv / "bin" / "layerfreeze")
    demo = _run([cli, "demo", "encoder"], away, env)
    assert demo.returncode == 2
    # (torch itself may warn first that numpy is missing: it does not depend on numpy)
    assert demo.stderr.strip().splitlines()[-1] == (
        "layerfreeze: error: the 'encoder' demo needs transformers, which is not installed: "
        "pip install 'layerfreeze[examples]'"
    )
    plot = _run([py, "-c", "import torch.nn as nn, layerfreeze as lf; "
                 "lf.plot_timeline(lf.Schedule().freeze('[0]'), nn.Sequential(nn.Linear(2, 2)), 2, 'p.png')"], away, env)
    assert plot.returncode == 1 and "pip install 'layerfreeze[report]'" in plot.stderr.splitlines()[-1]
    (away / "plan.yaml").write_text("rules:\n  - freeze: '[0]'\n")
    config = _run([py, "-c", "import layerfreeze as lf; lf.Schedule.from_file('plan.yaml')"], away, env)
    assert config.returncode == 1 and "pip install 'layerfreeze[config]'" in config.stderr.splitlines()[-1]
    (away / "plan.yaml").unlink()
    assert list(away.iterdir()) == []
