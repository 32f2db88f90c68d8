"""Schedules from dicts and files: round trips, formats and error messages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import layerfreeze as lf

ISSUE_EXAMPLE = {
    "rules": [
        {"freeze": "bert", "until_epoch": 4},
        {"gradual_unfreeze": "encoder.layer", "start_epoch": 2, "lr_decay": 0.8},
        {"progressive_freeze": ["layer1", "layer2", "layer3"], "start": 0.5, "end": 0.9, "total_epochs": 10},
    ]
}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bert = nn.Linear(3, 3)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
        self.layer1, self.layer2, self.layer3 = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)


def test_issue_example_round_trips_and_behaves_like_the_method_calls() -> None:
    s = lf.Schedule.from_dict(ISSUE_EXAMPLE)
    assert s.to_dict() == ISSUE_EXAMPLE
    by_calls = (
        lf.Schedule()
        .freeze("bert", until_epoch=4)
        .gradual_unfreeze("encoder.layer", start_epoch=2, lr_decay=0.8)
        .progressive_freeze(["layer1", "layer2", "layer3"], start=0.5, end=0.9, total_epochs=10)
    )
    assert by_calls.to_dict() == ISSUE_EXAMPLE
    model = Model()
    for epoch in range(11):
        assert s.frozen_at(model, epoch=epoch) == by_calls.frozen_at(model, epoch=epoch)
    assert "bert.weight" in s.frozen_at(model, epoch=3) and "bert.weight" not in s.frozen_at(model, epoch=4)


def test_every_option_round_trips() -> None:
    s = (
        lf.Schedule()
        .freeze(["bert", "norm"], exclude="bert.bias", from_step=2, until_step=9, mode="eval")
        .freeze(nn.BatchNorm1d, mode="keep")
        .gradual_unfreeze(["layer1", "layer2"], start_epoch=0, every=3, mode="keep")
        .progressive_freeze("encoder.layer", start=0.0, end=1.0, total_steps=100)
        .adaptive_freeze("encoder.layer", check_every=7, percentile=25, min_trainable=2, mode="eval")
    )
    d = s.to_dict()
    assert d["rules"][1] == {"freeze": "type:torch.nn.modules.batchnorm.BatchNorm1d", "mode": "keep"}
    again = lf.Schedule.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    model = Model()
    for step in (0, 3, 50, 99):
        assert again.frozen_at(model, epoch=1, step=step) == s.frozen_at(model, epoch=1, step=step)


YAML = """\
rules:
  - freeze: bert
    until_epoch: 4
  - gradual_unfreeze: encoder.layer
    start_epoch: 2
    lr_decay: 0.8
  - progressive_freeze: [layer1, layer2, layer3]
    start: 0.5
    end: 0.9
    total_epochs: 10
"""

TOML = """\
[[rules]]
freeze = "bert"
until_epoch = 4

[[rules]]
gradual_unfreeze = "encoder.layer"
start_epoch = 2
lr_decay = 0.8

[[rules]]
progressive_freeze = ["layer1", "layer2", "layer3"]
start = 0.5
end = 0.9
total_epochs = 10
"""


@pytest.mark.parametrize(
    ("name", "text"),
    [("plan.yaml", YAML), ("plan.yml", YAML), ("plan.toml", TOML), ("plan.json", json.dumps(ISSUE_EXAMPLE))],
)
def test_from_file_reads_each_format(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert lf.Schedule.from_file(path).to_dict() == ISSUE_EXAMPLE
    assert lf.Schedule.from_file(str(path)).to_dict() == ISSUE_EXAMPLE


def test_duplicate_yaml_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("rules:\n  - gradual_unfreeze: encoder.layer\n    start_epoch: 2\n    start_epoch: 5\n")
    # plain PyYAML keeps the last value silently
    import yaml

    assert yaml.safe_load(path.read_text())["rules"][0]["start_epoch"] == 5
    with pytest.raises(lf.ScheduleError, match=r"dup.yaml.*duplicate key 'start_epoch' \(first given on line 3\)"):
        lf.Schedule.from_file(path)


def test_duplicate_json_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text('{"rules": [{"freeze": "bert", "until_epoch": 1, "until_epoch": 2}]}')
    with pytest.raises(lf.ScheduleError, match="duplicate key 'until_epoch'"):
        lf.Schedule.from_file(path)


@pytest.mark.parametrize(
    ("rules", "pattern"),
    [
        (
            [{"freeze": "bert"}, {"gradual_unfreeze": "encoder.layer", "start_epooch": 2}],
            r"rule 1 \(gradual_unfreeze\), key 'start_epooch': unknown key; did you mean 'start_epoch'\?",
        ),
        (
            [{"freeze": "bert", "until_epoch": "4"}],
            r"rule 0 \(freeze\), key 'until_epoch': expected an int, got '4' \(str\)",
        ),
        (
            [{"freeze": "bert"}, {"freeze": "bert"}, {"progressive_freeze": "encoder.layer", "start": "half", "end": 1}],
            r"rule 2 \(progressive_freeze\), key 'start': expected a number, got 'half' \(str\)",
        ),
        ([{"gradual_unfreeze": 3, "start_epoch": 1}], r"rule 0 \(gradual_unfreeze\), key 'gradual_unfreeze': expected a selector"),
        ([{"freeze": "bert", "mode": "frozen"}], r"rule 0 \(freeze\), key 'mode': expected 'norm', 'eval' or 'keep'"),
        ([{"adaptive_freeze": "encoder.layer"}], r"rule 0 \(adaptive_freeze\): missing key 'check_every'"),
        ([{"until_epoch": 3}], r"rule 0: no rule kind; each rule has exactly one of the keys 'freeze'"),
        ([{"freeze": "a", "gradual_unfreeze": "b"}], r"rule 0: several rule kinds"),
        ([{"gradual_unfreeze": "x", "start_epoch": 1, "lr_decay": 2.0}], r"rule 0 \(gradual_unfreeze\): lr_decay must be in"),
        (["bert"], r"rule 0: expected a mapping"),
    ],
)
def test_config_errors_name_rule_and_key(rules: list[object], pattern: str) -> None:
    with pytest.raises(lf.ScheduleError, match=pattern):
        lf.Schedule.from_dict({"rules": rules})


def test_config_shape_errors() -> None:
    with pytest.raises(lf.ScheduleError, match="mapping with a 'rules' list"):
        lf.Schedule.from_dict([{"freeze": "bert"}])
    with pytest.raises(lf.ScheduleError, match="unknown top-level key 'rule'"):
        lf.Schedule.from_dict({"rule": []})
    with pytest.raises(TypeError, match="key 'rules': expected a list"):
        lf.Schedule.from_dict({"rules": {"freeze": "bert"}})


def test_selector_matching_nothing_names_rule_and_key() -> None:
    model = Model()
    s = lf.Schedule.from_dict({"rules": [{"freeze": "bert"}, {"gradual_unfreeze": "encoder.layers", "start_epoch": 1}]})
    with pytest.raises(lf.SelectorError, match=r"rule 1 \(gradual_unfreeze\), key 'gradual_unfreeze'.*encoder.layers") as info:
        lf.Freezer(model, torch.optim.SGD(model.parameters(), lr=0.1), s)
    assert "encoder.layer" in info.value.suggestions
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    bad_exclude = lf.Schedule.from_dict({"rules": [{"freeze": "bert", "exclude": "bert.bais"}]})
    with pytest.raises(lf.SelectorError, match=r"rule 0 \(freeze\), key 'exclude'.*bert.bais"):
        bad_exclude.validate(model)


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "plan.ini"
    bad.write_text("")
    with pytest.raises(lf.ScheduleError, match="unknown config format '.ini'"):
        lf.Schedule.from_file(bad)
    broken = tmp_path / "plan.yaml"
    broken.write_text("rules: [\n")
    with pytest.raises(lf.ScheduleError, match="plan.yaml: not valid YAML"):
        lf.Schedule.from_file(broken)
    broken_toml = tmp_path / "plan.toml"
    broken_toml.write_text("[[rules]\n")
    with pytest.raises(lf.ScheduleError, match="plan.toml: not valid TOML"):
        lf.Schedule.from_file(broken_toml)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(lf.ScheduleError, match="got None"):
        lf.Schedule.from_file(empty)
    with pytest.raises(FileNotFoundError):
        lf.Schedule.from_file(tmp_path / "missing.yaml")


def test_core_import_loads_no_optional_dependency() -> None:
    code = textwrap.dedent(
        """
        import sys, layerfreeze
        print(sorted(m for m in ("yaml", "matplotlib", "rich", "tomli") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_round_trip_files_and_errors(tmp_path: Path, encoder) -> None:
    d = {
        "rules": [
            {"freeze": "embed", "until_epoch": 4},
            {"gradual_unfreeze": "encoder.layer", "start_epoch": 2, "lr_decay": 0.8},
            {"progressive_freeze": ["encoder.layer[0]", "encoder.layer[1]"], "start": 0.5, "end": 0.9, "total_epochs": 10},
            {"adaptive_freeze": "encoder.layer", "check_every": 5},
        ]
    }
    s = lf.Schedule.from_dict(d)
    assert s.to_dict() == d
    assert lf.Schedule.from_dict(s.to_dict()).to_dict() == d
    (tmp_path / "s.json").write_text(json.dumps(d))
    (tmp_path / "s.yaml").write_text("rules:\n  - freeze: embed\n    until_epoch: 4\n")
    (tmp_path / "s.toml").write_text('[[rules]]\nfreeze = "embed"\nuntil_epoch = 4\n')
    assert lf.Schedule.from_file(tmp_path / "s.json").to_dict() == d
    for name in ("s.yaml", "s.toml"):
        assert lf.Schedule.from_file(tmp_path / name).to_dict() == {"rules": [d["rules"][0]]}
    with pytest.raises(ValueError, match=r"rule 1 \(gradual_unfreeze\).*start_epok"):
        lf.Schedule.from_dict({"rules": [d["rules"][0], {"gradual_unfreeze": "x", "start_epok": 1}]})
    with pytest.raises(ValueError, match=r"rule 0 \(freeze\).*until_epoch"):
        lf.Schedule.from_dict({"rules": [{"freeze": "x", "until_epoch": "four"}]})
    with pytest.raises(lf.SelectorError, match=r"rule 0 \(freeze\).*'freeze'"):
        lf.Schedule.from_dict({"rules": [{"freeze": "embd", "until_epoch": 1}]}).validate(encoder)
    (tmp_path / "dup.yaml").write_text("rules:\n  - freeze: embed\n    freeze: norm\n")
    with pytest.raises(ValueError, match="freeze"):
        lf.Schedule.from_file(tmp_path / "dup.yaml")


def test_a_non_utf8_config_names_the_file(tmp_path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_bytes("rules:\n  - freeze: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(lf.ScheduleError, match=r"plan\.yaml: not UTF-8 text .*save the config as UTF-8"):
        lf.Schedule.from_file(path)
