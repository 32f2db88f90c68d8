"""The public API exactly as issues 2, 3 and 5 write it: names, keywords,
return types, error types and the behaviour each promises, called from the
outside only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import layerfreeze as lf
from layerfreeze import cli


class Seed(nn.Module):
    """The seed's net: 5 linear layers 10-3-3-3-3-1 (73 parameters, fc2 holds 12)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.fc4, self.fc5 = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.fc1, self.fc2, self.fc3, self.fc4, self.fc5):
            x = layer(x)
        return x


class Encoder(nn.Module):
    """A BERT-shaped toy: encoder.layer[i].attention / .LayerNorm / .dropout."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            nn.ModuleDict({"attention": nn.Linear(4, 4), "LayerNorm": nn.LayerNorm(4), "dropout": nn.Dropout(0.5)})
            for _ in range(n)
        )
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(1)
        for block in self.encoder.layer:
            h = block["dropout"](block["LayerNorm"](block["attention"](h)))
        return self.head(self.norm(h))


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=False)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    nn.functional.mse_loss(model(x), torch.zeros(4, 1)).backward()
    opt.step()


def layer(i: int) -> list[str]:
    return [f"encoder.layer.{i}.{m}.{p}" for m in ("attention", "LayerNorm") for p in ("weight", "bias")]


# --------------------------------------------------------------------------- selectors


def test_select_every_selector_form() -> None:
    m = Encoder()
    assert lf.select(m, "encoder.layer.0") == layer(0)
    assert lf.select(m, "encoder.layer.0.attention.bias") == ["encoder.layer.0.attention.bias"]
    assert lf.select(m, "encoder.layer.*.attention") == [n for i in range(4) for n in layer(i) if "attention" in n]
    assert lf.select(m, "**.LayerNorm") == [n for i in range(4) for n in layer(i) if "LayerNorm" in n]
    assert lf.select(m, "encoder.layer[0:2]") == layer(0) + layer(1)
    assert lf.select(m, "encoder.layer[-2:]") == layer(2) + layer(3)
    assert lf.select(m, "encoder.layer[3]") == layer(3)
    assert lf.select(m, r"re:encoder\.layer\.[13]\.attention\.weight") == [
        "encoder.layer.1.attention.weight",
        "encoder.layer.3.attention.weight",
    ]
    assert lf.select(m, nn.BatchNorm1d) == ["norm.weight", "norm.bias"] == lf.select(m, "type:BatchNorm1d")
    assert lf.select(m, lambda name, module: name == "encoder.layer.2") == layer(2)
    # several selectors; exclude= takes one selector or a sequence
    assert lf.select(m, "encoder.layer[0]", "norm", exclude="**.bias") == [
        "encoder.layer.0.attention.weight",
        "encoder.layer.0.LayerNorm.weight",
        "norm.weight",
    ]
    assert lf.select(m, "encoder", exclude=["**.LayerNorm", "encoder.layer[1:]"]) == layer(0)[:2]
    # a shared parameter once, under its first name, in model order
    assert lf.select(m, "head") == ["embed.weight", "head.bias"]


def test_selector_error_is_a_value_error_naming_selector_and_closest_names() -> None:
    m = Encoder()
    with pytest.raises(lf.SelectorError) as info:
        lf.freeze(m, "norm", "encoder.layr")
    err = info.value
    assert isinstance(err, ValueError)
    assert "encoder.layr" in str(err) and "'encoder.layer'" in str(err)
    assert "encoder.layer" in err.suggestions
    assert all(p.requires_grad for p in m.parameters())  # validated before changing anything


@pytest.mark.parametrize(
    "bad",
    [
        lambda m: lf.freeze(m, 3),  # an unknown selector form
        lambda m: lf.freeze(m, "norm", exclude="norm"),  # exclude removes everything
        lambda m: lf.freeze(m.state_dict()),  # not a Module
    ],
)
def test_bad_input_raises_and_changes_nothing(bad: Any) -> None:
    m = Encoder()
    with pytest.raises((ValueError, TypeError)):
        bad(m)
    assert all(p.requires_grad for p in m.parameters())


# --------------------------------------------------------------------------- functions


def test_freeze_unfreeze_and_their_modes() -> None:
    m = Encoder()
    m.train()
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    names = lf.freeze(m, "encoder.layer[0]", "norm")  # mode="norm" by default
    assert names == layer(0) + ["norm.weight", "norm.bias"]
    assert all(not p.requires_grad and p.grad is None for n, p in m.named_parameters() if n in names)
    m.train()
    assert not m.norm.training  # running statistics stay frozen across model.train()
    assert m.encoder.layer[0]["dropout"].training  # "norm" leaves dropout alone
    assert lf.unfreeze(m, "norm") == ["norm.weight", "norm.bias"]
    m.train()
    assert m.norm.training

    lf.freeze(m, "encoder.layer[1]", mode="eval")
    m.train()
    assert not m.encoder.layer[1]["dropout"].training  # the whole subtree is held in eval
    lf.freeze(m, "norm", mode="keep")
    m.train()
    assert m.norm.training  # "keep" touches no modes

    assert lf.unfreeze(m) == lf.select(m)  # no selector: the whole model
    m.train()
    assert all(p.requires_grad for p in m.parameters()) and all(x.training for x in m.modules())
    assert lf.freeze(m) == lf.select(m)
    assert lf.count_parameters(m).trainable == 0


def test_frozen_context_restores_flags_and_modes_even_on_error() -> None:
    m = Encoder()
    lf.freeze(m, "norm")
    m.train()
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    modes = {n: x.training for n, x in m.named_modules()}
    with pytest.raises(RuntimeError, match="inside"):
        with lf.frozen(m, "encoder", mode="eval") as names:
            assert names == lf.select(m, "encoder")
            m.train()
            assert not m.encoder.layer[0]["dropout"].training
            raise RuntimeError("inside")
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert {n: x.training for n, x in m.named_modules()} == modes
    m.train()
    assert not m.norm.training and m.encoder.layer[0]["dropout"].training


def test_count_parameters_and_summary() -> None:
    net = Seed()
    lf.freeze(net, "fc1", "fc3")  # 33 + 12 of 73
    count = lf.count_parameters(net)
    assert (count.trainable, count.frozen, count.total) == (28, 45, 73)
    lf.unfreeze(net)
    lf.freeze(net, "fc2")
    text = lf.summary(net, depth=2)
    assert isinstance(text, str)
    assert "trainable params: 61 || all params: 73 || trainable%: 83.56" in text
    header = next(line for line in text.splitlines() if "module" in line)
    for col in ("module", "type", "parameters", "trainable", "frozen", "mode"):
        assert col in header
    tied = Encoder()
    assert lf.count_parameters(tied).total == sum(p.numel() for p in tied.parameters())  # shared once


# --------------------------------------------------------------------------- Freezer


def test_freezer_keeps_the_optimizer_in_step() -> None:
    net = Seed()
    opt = torch.optim.AdamW([p for n, p in net.named_parameters() if not n.startswith("fc2")], lr=0.1)
    fz = lf.Freezer(net, opt, None, guard=True, release_state=False, unfreeze_lr=0.02)
    assert fz.model is net
    assert fz.freeze("fc2", mode="norm") == ["fc2.weight", "fc2.bias"]
    assert fz.unfreeze("fc2.weight", lr=0.3) == ["fc2.weight"]
    assert opt.param_groups[-1]["params"] == [net.fc2.weight]
    assert opt.param_groups[-1]["lr"] == opt.param_groups[-1]["initial_lr"] == 0.3
    fz.unfreeze("fc2.bias")
    assert opt.param_groups[-1]["lr"] == 0.02  # unfreeze_lr
    fz.freeze("fc1")
    fz.unfreeze("fc1")  # held at 0.1: unfreeze_lr is its base lr now, in a group of its own
    assert len(opt.param_groups) == 4
    assert opt.param_groups[-1]["params"] == [net.fc1.weight, net.fc1.bias]
    assert opt.param_groups[-1]["lr"] == 0.02
    fz.freeze("fc1")
    fz.unfreeze("fc1")  # already in a group at that lr: nothing added
    assert len(opt.param_groups) == 4


def test_freezer_falls_back_to_group_zero_lr_and_release_state_drops_state() -> None:
    net = Seed()
    opt = torch.optim.Adam(net.fc1.parameters(), lr=0.07)
    fz = lf.Freezer(net, opt, release_state=True)
    lf.freeze(net, "fc2")
    fz.unfreeze("fc2")
    assert opt.param_groups[-1]["lr"] == 0.07
    train_step(net, opt)
    assert net.fc2.weight in opt.state
    fz.freeze("fc2")
    assert net.fc2.weight not in opt.state and net.fc1.weight in opt.state


@pytest.mark.parametrize("guard", [True, False])
def test_guard_catches_one_changed_element(guard: bool) -> None:
    net = Seed()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, guard=guard)
    fz.freeze("fc2")
    train_step(net, opt)
    fz.check()
    with torch.no_grad():
        net.fc2.weight[2, 1] = torch.nextafter(net.fc2.weight[2, 1], torch.tensor(9.0))  # one ulp
    if guard:  # after every optimizer.step()
        with pytest.raises(lf.FrozenParameterChanged, match="fc2.weight") as info:
            train_step(net, opt)
    else:  # only on demand
        train_step(net, opt)
        with pytest.raises(lf.FrozenParameterChanged, match="fc2.weight") as info:
            fz.check()
    assert info.value.names == ["fc2.weight"]
    assert "cause" in str(info.value).lower()
    assert isinstance(info.value, RuntimeError)


def test_seed_experiment_through_the_api(caplog: Any) -> None:
    net = Seed()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1)
    fz = lf.Freezer(net, optimizer, lf.Schedule().freeze("fc2", until_epoch=4))
    start = net.fc2.weight.detach().clone()
    counts = []
    with caplog.at_level(logging.INFO, logger="layerfreeze"):
        for epoch in range(1, 10):
            made = fz.set_epoch(epoch)
            if epoch == 1:
                assert [(t.action, t.count, t.trainable) for t in made] == [("freeze", 12, 61)]
            elif epoch == 4:
                assert [(t.action, t.count, t.trainable) for t in made] == [("unfreeze", 12, 73)]
            else:
                assert made == []
            counts.append(lf.count_parameters(net).trainable)
            train_step(net, optimizer)  # zero_grad(set_to_none=False): the AdamW trap
            if epoch <= 3:
                assert torch.equal(net.fc2.weight, start)
        assert not torch.equal(net.fc2.weight, start)
    assert counts == [61, 61, 61, 73, 73, 73, 73, 73, 73]
    logged = [r.getMessage() for r in caplog.records if r.name == "layerfreeze"]
    assert any("fc2.weight" in msg and "61" in msg for msg in logged)
    assert any("73" in msg for msg in logged)


def test_set_step_and_freezer_state_dict_round_trip() -> None:
    net = Seed()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    s = lf.Schedule().freeze("fc1", from_step=2, until_step=5)
    fz = lf.Freezer(net, opt, s)
    assert fz.set_step(1) == [] and fz.set_step(2)[0].names == ("fc1.weight", "fc1.bias")
    state = fz.state_dict()
    other = Seed()
    fresh = lf.Freezer(other, torch.optim.SGD(other.parameters(), lr=0.1), lf.Schedule().freeze("fc1", from_step=2, until_step=5))
    fresh.load_state_dict(state)
    assert [n for n, p in other.named_parameters() if not p.requires_grad] == ["fc1.weight", "fc1.bias"]
    assert [t.action for t in fresh.set_step(5)] == ["unfreeze"]
    with pytest.raises(lf.StateDictError):
        lf.Freezer(Encoder()).load_state_dict(state)  # names this model does not have


# --------------------------------------------------------------------------- Schedule


def test_schedule_freeze_windows_and_later_rules_win() -> None:
    m = Encoder()
    s = (
        lf.Schedule()
        .freeze("encoder", from_epoch=1, until_epoch=3, mode="eval")
        .freeze("encoder.layer[0]", from_step=10, until_step=None, mode="norm")
        .freeze("encoder.layer[3]", until_epoch=2)
    )
    assert s.frozen_at(m, epoch=0) == layer(3)
    assert s.frozen_at(m, epoch=1) == lf.select(m, "encoder")
    assert s.frozen_at(m, epoch=2) == layer(0) + layer(1) + layer(2)  # until is exclusive; rule 2 wins
    assert s.frozen_at(m, epoch=3, step=10) == layer(0)
    assert s.frozen_at(m, epoch=3, step=3) == []


def test_gradual_unfreeze_with_lr_decay() -> None:
    m = Encoder()
    s = lf.Schedule().gradual_unfreeze("encoder.layer", start_epoch=1, every=2, lr_decay=0.5)
    assert s.frozen_at(m, epoch=0) == lf.select(m, "encoder")
    assert s.frozen_at(m, epoch=1) == layer(0) + layer(1) + layer(2)
    assert s.frozen_at(m, epoch=3) == layer(0) + layer(1)
    assert s.frozen_at(m, epoch=7) == []
    opt = torch.optim.SGD(m.parameters(), lr=0.8)  # every parameter already in group 0
    fz = lf.Freezer(m, opt, s)
    fz.set_epoch(7)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert [lr_of[id(m.encoder.layer[i]["attention"].weight)] for i in range(4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert lr_of[id(m.norm.weight)] == 0.8


def test_progressive_freeze_thresholds() -> None:
    m = Encoder()
    s = lf.Schedule().progressive_freeze("encoder.layer", start=0.5, end=0.8, total_epochs=10)
    # thresholds 0.5, 0.6, 0.7, 0.8 for the four groups, bottom first
    assert s.frozen_at(m, epoch=4) == []
    assert s.frozen_at(m, epoch=5) == layer(0)
    assert s.frozen_at(m, epoch=7) == layer(0) + layer(1) + layer(2)
    assert s.frozen_at(m, epoch=9) == lf.select(m, "encoder")
    by_step = lf.Schedule().progressive_freeze(["encoder.layer[0]", "norm"], start=0.0, end=1.0, total_steps=4)
    assert by_step.frozen_at(m, step=0) == layer(0)
    assert by_step.frozen_at(m, step=4) == layer(0) + ["norm.weight", "norm.bias"]


def test_adaptive_freeze_freezes_settled_bottom_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)]), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: gradients settle at once
    s = lf.Schedule().adaptive_freeze("0", check_every=2, percentile=50, min_trainable=1)
    fz = lf.Freezer(model, opt, s)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for n in range(6):
        opt.zero_grad()
        model(x).sum().backward()
        with torch.no_grad():  # the top groups' gradients keep changing, the bottom ones' do not
            for i, block in enumerate(model[0]):
                if i >= 2 and block.weight.grad is not None:
                    block.weight.grad.mul_(1 + n * i)
        opt.step()
    made = fz.set_epoch(0)
    frozen = [i for i, b in enumerate(model[0]) if not b.weight.requires_grad]
    assert frozen and frozen == list(range(len(frozen)))  # a bottom prefix
    assert len(frozen) <= 3  # min_trainable=1 keeps the top group
    assert made and made[0].action == "freeze"
    assert s.frozen_at(model) == [n for n, p in model.named_parameters() if not p.requires_grad]


def test_config_round_trip_files_and_errors(tmp_path: Path) -> None:
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
        lf.Schedule.from_dict({"rules": [{"freeze": "embd", "until_epoch": 1}]}).validate(Encoder())
    (tmp_path / "dup.yaml").write_text("rules:\n  - freeze: embed\n    freeze: norm\n")
    with pytest.raises(ValueError, match="freeze"):
        lf.Schedule.from_file(tmp_path / "dup.yaml")


def test_timeline_and_plot_timeline(tmp_path: Path) -> None:
    m = Encoder()
    s = lf.Schedule().freeze("embed", until_epoch=1).gradual_unfreeze("encoder.layer", start_epoch=1, lr_decay=0.5)
    rows = s.timeline(m, epochs=5)
    assert [r.epoch for r in rows] == [0, 1, 2, 3, 4]
    assert "embed" in rows[0].frozen and "encoder.layer.3" in rows[0].frozen
    assert rows[1].frozen == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert rows[0].trainable < rows[1].trainable < rows[4].trainable == lf.count_parameters(m).total
    assert rows[4].lr["encoder.layer.0"] == pytest.approx(0.125 * rows[4].lr["encoder.layer.3"])
    out = lf.plot_timeline(s, m, epochs=5, path=tmp_path / "plan.png")
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lf.plot_timeline(s, m, 5, tmp_path / "plan2.png")
    assert (tmp_path / "plan2.png").stat().st_size > 1000


# --------------------------------------------------------------------------- command line


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


# --------------------------------------------------------------------------- integrations


def test_lightning_callback_takes_freezer_kwargs() -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from layerfreeze.lightning import LayerFreeze

    class Module(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.head(self.backbone(x)), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.head.parameters(), lr=0.1)  # the backbone in no group

    module = Module()
    before = module.backbone.weight.detach().clone()
    cb = LayerFreeze(lf.Schedule().freeze("backbone", until_epoch=1), unfreeze_lr=0.01)
    ds = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
    )
    trainer.fit(module, torch.utils.data.DataLoader(ds, batch_size=4))
    assert [t.action for t in cb.transitions] == ["freeze", "unfreeze"]
    opt = trainer.optimizers[0]
    backbone_group = next(g for g in opt.param_groups if any(p is module.backbone.weight for p in g["params"]))
    assert backbone_group["lr"] == 0.01  # unfreeze_lr reached the Freezer
    assert not torch.equal(module.backbone.weight, before)


def test_transformers_callback_takes_freezer_kwargs(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from layerfreeze.transformers import LayerFreezeCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
        vocab_size=30, max_position_embeddings=8, num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(1, 30, (8, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i], "labels": torch.tensor(i % 2)} for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    layer0 = model.bert.encoder.layer[0].output.dense.weight
    before = layer0.detach().clone()
    schedule = lf.Schedule().gradual_unfreeze("bert.encoder.layer", start_epoch=1, lr_decay=0.5)
    cb = LayerFreezeCallback(schedule, guard=True, release_state=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert isinstance(cb.freezer, lf.Freezer)
    # layer 1 unfreezes at epoch 1, layer 0 at epoch 2, and then really trains
    assert [t.action for t in cb.transitions] == ["freeze", "unfreeze", "unfreeze"]
    assert not torch.equal(layer0, before)
    lr_of = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    top = model.bert.encoder.layer[1].output.dense.weight
    assert lr_of[id(layer0)] == pytest.approx(0.5 * lr_of[id(top)])  # lr_decay holds under the Trainer


def test_python_dash_m_runs_the_command_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "layerfreeze", "inspect", "layerfreeze.demos.seed:SeedNet", "--select", "fc2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "selected: 12 of 73 params" in done.stdout
