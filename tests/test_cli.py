"""The layerfreeze command line: demo dispatch, inspect, one-line errors with exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from layerfreeze import cli

SEED_NET = "layerfreeze.demos.seed:SeedNet"


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_module_target_marks_selection(capsys):
    code, out, err = run_cli(capsys, "inspect", SEED_NET, "--select", "fc2", "--select", "fc5.bias")
    assert code == 0, err
    lines = {line.split()[1]: line for line in out.splitlines() if "(Linear)" in line}
    assert "[selected]" in lines["fc2"]
    assert "[1 of 4 selected]" in lines["fc5"]
    assert "selected" not in lines["fc1"]
    assert "12 params" in lines["fc2"]
    assert "selected: 13 of 73 params (3 tensors)" in out


def test_inspect_without_selectors_shows_counts(capsys):
    code, out, _ = run_cli(capsys, "inspect", SEED_NET)
    assert code == 0
    assert "33 params" in out and "total: 73 params (10 tensors)" in out
    assert "selected" not in out


def test_inspect_exclude_and_depth(capsys):
    code, out, _ = run_cli(capsys, "inspect", SEED_NET, "-s", "type:Linear", "-x", "fc1", "--depth", "0")
    assert code == 0
    assert "fc1" not in out  # depth 0 shows only the root
    assert "[40 of 73 selected]" in out


def test_inspect_file_target_with_function_and_instance(tmp_path, capsys):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(
        """
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))

        model = build()
        """
    ))
    code, out, err = run_cli(capsys, "inspect", f"{path}:build", "-s", "[0:2]")
    assert code == 0, err
    assert "[56 of 74 selected]" in out
    assert "BatchNorm1d" in out
    code, out, _ = run_cli(capsys, "inspect", f"{path}:model", "-s", "type:BatchNorm1d")
    assert code == 0
    assert "selected: 16 of 74 params" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "no_colon_here"], r"must be package\.module:attr"),
        (["inspect", "layerfreeze.demos.sed:SeedNet"], r"cannot import 'layerfreeze\.demos\.sed'"),
        (["inspect", "layerfreeze.demos.seed:SeedNt"], r"has no attribute 'SeedNt'; closest names: 'SeedNet'"),
        (["inspect", "torch.nn:Linear"], r"instantiating torch\.nn:Linear with no arguments failed"),
        (["inspect", "layerfreeze.demos.seed:UNFREEZE_EPOCH"], r"is a int, not an nn\.Module"),
        (["inspect", "missing_file.py:net"], r"no such file: missing_file\.py"),
        (["inspect", SEED_NET, "-s", "fc9"], r"selector 'fc9' matches nothing in SeedNet; closest names: 'fc5'"),
        (["inspect", SEED_NET, "-s", "fc2", "-x", "fc2"], r"exclude= removes every parameter"),
        (["inspect", SEED_NET, "-s", "fc[x]"], r"\[x\] is neither an index"),
        (["inspect", SEED_NET, "--depth", "-1"], r"--depth must be 0 or more"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("layerfreeze: error: ")
    assert re.search(message, err), err


def test_file_target_that_raises_is_reported(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    code, _, err = run_cli(capsys, "inspect", f"{path}:net")
    assert code == 2
    assert "RuntimeError: boom" in err


def test_missing_demo_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.DEMOS, "seed", "layerfreeze.demos.not_written_yet")
    code, _, err = run_cli(capsys, "demo")
    assert code == 2
    assert "the 'seed' demo is not available" in err


def test_demo_dispatches_to_the_demo_main(monkeypatch, capsys):
    from layerfreeze.demos import seed

    monkeypatch.setattr(seed, "main", lambda: print("seed main ran") or 0)
    code, out, _ = run_cli(capsys, "demo", "seed")
    assert (code, out) == (0, "seed main ran\n")


def test_unknown_demo_and_no_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "nope"])
    assert info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_subcommands_are_registered_from_the_list():
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"demo", "inspect"} <= names
    assert len(names) == len(cli.SUBCOMMANDS)


def test_entry_point_runs_as_a_program():
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "layerfreeze"]
    assert ep.value == "layerfreeze.cli:main"
    script = Path(sys.executable).with_name("layerfreeze")
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from layerfreeze.cli import main; sys.exit(main())"]
    proc = subprocess.run([*cmd, "inspect", SEED_NET, "-s", "fc9"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "layerfreeze: error: --select: selector 'fc9' matches nothing in SeedNet; closest names: 'fc5', 'fc4', 'fc3'"
    ]


def test_inspect_marks_a_module_with_an_excluded_child_as_partly_selected(tmp_path, capsys):
    path = tmp_path / "blocks.py"
    path.write_text(textwrap.dedent(
        """
        import torch.nn as nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)
                self.norm = nn.LayerNorm(4)

        def build():
            return nn.Sequential(Block(), Block())
        """
    ))
    code, out, err = run_cli(capsys, "inspect", f"{path}:build", "-s", "[0]", "-x", "**.norm")
    assert code == 0, err
    rows = [line for line in out.splitlines() if "(Block)" in line or "(Linear)" in line]
    assert "[20 of 28 selected]" in rows[0]
    assert rows[1].rstrip().endswith("[selected]")
    assert "selected" not in rows[2] and "selected" not in rows[3]


def test_version_prints_the_package_version(capsys):
    import layerfreeze

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"layerfreeze {layerfreeze.__version__}"


def test_model_module_in_the_current_folder_imports_as_with_python_m(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodel_cwd.py").write_text(
        "import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))\n"
    )
    (tmp_path / "plan.json").write_text('{"rules": [{"freeze": "[0]", "until_epoch": 1}]}')
    monkeypatch.chdir(tmp_path)
    # a console script's sys.path: its bin folder first, neither "" nor the current folder
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mymodel_cwd", raising=False)
    code, out, err = run_cli(capsys, "plan", "plan.json", "--model", "mymodel_cwd:build", "--epochs", "2")
    assert code == 0, err
    assert "19" in out and "frozen" in out
    code, out, err = run_cli(capsys, "inspect", "mymodel_cwd:build")
    assert code == 0, err
    assert "total: 19 params" in out


def test_selector_errors_read_without_an_argument_prefix(capsys):
    code, _, err = run_cli(capsys, "inspect", SEED_NET, "-s", "fc9")
    assert code == 2
    assert "argument" not in err
    assert err.startswith("layerfreeze: error: --select: selector 'fc9' matches nothing")


def test_cli_plan_and_inspect(tmp_path: Path, capsys: Any) -> None:
    target = tmp_path / "model.py"
    target.write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))\n"
    )
    config = tmp_path / "plan.yaml"
    config.write_text("rules:\n  - gradual_unfreeze: '1'\n    start_epoch: 1\n")
    png = tmp_path / "plan.png"
    assert cli.main(["plan", str(config), "--model", f"{target}:build", "--epochs", "3", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "1.0" in out and "1.1" in out
    assert png.read_bytes()[:4] == b"\x89PNG"

    code = cli.main(["inspect", f"{target}:build", "--select", "1", "--exclude", "1.1"])
    out = capsys.readouterr().out
    assert code == 0 and "selected: 6 of 21 params" in out

    code = cli.main(["inspect", f"{target}:build", "--select", "1.5"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "closest names" in err
    assert cli.main(["inspect", f"{target}:buld"]) == 2
    assert "'build'" in capsys.readouterr().err


def test_python_dash_m_runs_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "layerfreeze", "inspect", "layerfreeze.demos.seed:SeedNet", "--select", "fc2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "selected: 12 of 73 params" in done.stdout
