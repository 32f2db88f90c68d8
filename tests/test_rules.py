"""Schedule rules: gradual unfreezing, progressive and adaptive freezing."""

from __future__ import annotations

import logging

import pytest
import torch
from tests.conftest import encoder_layer, stack
from torch import nn

import layerfreeze as lf
from layerfreeze.core import kept_in_eval
from layerfreeze.rules import AdaptiveFreezeRule


def frozen_layers(model: nn.Module) -> list[int]:
    return [i for i, m in enumerate(model[0]) if not m.weight.requires_grad]


# --------------------------------------------------------------------------- gradual unfreeze


def test_gradual_unfreeze_container_top_first_every_two_epochs() -> None:
    model = stack(4)
    s = lf.Schedule().gradual_unfreeze("0", start_epoch=2, every=2)
    got = [[n.split(".")[1] for n in s.frozen_at(model, epoch=e) if n.endswith("weight")] for e in range(10)]
    assert got == [
        ["0", "1", "2", "3"],
        ["0", "1", "2", "3"],
        ["0", "1", "2"],
        ["0", "1", "2"],
        ["0", "1"],
        ["0", "1"],
        ["0"],
        ["0"],
        [],
        [],
    ]


def test_gradual_unfreeze_list_of_selectors_and_discriminative_lrs() -> None:
    model = stack(3)
    opt = torch.optim.AdamW(model[1].parameters(), lr=0.1)
    s = lf.Schedule().gradual_unfreeze(["0.0", "0.1", "0.2"], start_epoch=1, lr_decay=0.5)
    fz = lf.Freezer(model, opt, s)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert [lr_of[id(model[0][i].weight)] for i in range(3)] == pytest.approx([0.025, 0.05, 0.1])
    assert lr_of[id(model[1].weight)] == 0.1
    fz.set_epoch(0)
    assert frozen_layers(model) == [0, 1, 2]
    fz.set_epoch(1)
    assert frozen_layers(model) == [0, 1]
    fz.set_epoch(3)
    assert frozen_layers(model) == []


def test_gradual_unfreeze_uses_unfreeze_lr_as_base() -> None:
    model = stack(2)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    lf.Freezer(model, opt, lf.Schedule().gradual_unfreeze("0", start_epoch=0, lr_decay=0.1), unfreeze_lr=0.01)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model[0][0].weight)] == pytest.approx(0.001)
    assert lr_of[id(model[0][1].weight)] == pytest.approx(0.01)


def test_gradual_unfreeze_on_bert_encoder_layers(tiny_bert: nn.Module) -> None:
    s = lf.Schedule().freeze("embeddings").gradual_unfreeze("encoder.layer", start_epoch=1, lr_decay=0.8)
    groups = [label for label, _ in s.groups(tiny_bert)]
    assert groups == ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "encoder.layer.3"]
    opt = torch.optim.AdamW(tiny_bert.pooler.parameters(), lr=1e-3)
    fz = lf.Freezer(tiny_bert, opt, s)
    fz.set_epoch(0)
    assert all(not p.requires_grad for p in tiny_bert.encoder.parameters())
    fz.set_epoch(2)
    trainable = {n.split(".")[2] for n, p in tiny_bert.encoder.named_parameters(prefix="encoder") if p.requires_grad}
    assert trainable == {"2", "3"}
    assert all(not p.requires_grad for p in tiny_bert.embeddings.parameters())
    # every encoder parameter is registered, at lr * 0.8**k from the top
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for k, layer in enumerate(reversed(tiny_bert.encoder.layer)):
        assert [lr_of[id(p)] for p in layer.parameters()] == pytest.approx([1e-3 * 0.8**k] * 16)


def test_gradual_unfreeze_decides_nothing_without_an_epoch() -> None:
    model = stack(2)
    s = lf.Schedule().gradual_unfreeze("0", start_epoch=1)
    assert s.frozen_at(model, step=5) == []
    fz = lf.Freezer(model, None, s)
    assert fz.set_step(3) == []


# --------------------------------------------------------------------------- progressive freeze


def test_progressive_freeze_thresholds_by_epoch() -> None:
    model = stack(3)
    s = lf.Schedule().progressive_freeze(["0.0", "0.1", "0.2"], start=0.5, end=0.9, total_epochs=10)
    fz = lf.Freezer(model, None, s)
    seen = []
    for e in range(10):
        fz.set_epoch(e)
        seen.append(frozen_layers(model))
    # group i freezes at 0.5 + 0.4 * i / 2: epochs 5, 7, 9
    assert seen == [[]] * 5 + [[0]] * 2 + [[0, 1]] * 2 + [[0, 1, 2]]


def test_progressive_freeze_by_steps_top_trains_to_the_end() -> None:
    model = stack(4)
    s = lf.Schedule().progressive_freeze("0", start=0.0, end=1.0, total_steps=12)
    fz = lf.Freezer(model, None, s)
    got = {}
    for step in range(12):
        fz.set_step(step)
        got[step] = frozen_layers(model)
    assert got[0] == [0]
    assert got[4] == [0, 1]
    assert got[8] == [0, 1, 2]
    assert got[11] == [0, 1, 2]  # the top group freezes only at the very end
    assert s.frozen_at(model, step=12) != [] and len(s.frozen_at(model, step=12)) == 8


def test_progressive_freeze_arguments_are_checked() -> None:
    with pytest.raises(lf.ScheduleError, match="exactly one of total_epochs and total_steps"):
        lf.Schedule().progressive_freeze("0", start=0.1, end=0.5)
    with pytest.raises(lf.ScheduleError, match=r"end must be in \[0.6, 1.0\]"):
        lf.Schedule().progressive_freeze("0", start=0.6, end=0.5, total_epochs=3)


# --------------------------------------------------------------------------- composition


def test_later_rules_win_where_they_overlap() -> None:
    model = stack(3)
    s = lf.Schedule().gradual_unfreeze("0", start_epoch=0, every=1).freeze("0.2", until_epoch=4)
    assert [frozen_layers_at(s, model, e) for e in range(5)] == [[0, 1, 2], [0, 2], [2], [2], []]
    t = lf.Schedule().freeze("0.2", until_epoch=4).gradual_unfreeze("0", start_epoch=0, every=1)
    assert frozen_layers_at(t, model, 0) == [0, 1]


def frozen_layers_at(s: lf.Schedule, model: nn.Module, epoch: int) -> list[int]:
    names = s.frozen_at(model, epoch=epoch)
    return sorted({int(n.split(".")[1]) for n in names if n.startswith("0.")})


def test_transitions_are_logged_and_returned(caplog: pytest.LogCaptureFixture) -> None:
    model = stack(2)
    fz = lf.Freezer(model, torch.optim.SGD(model.parameters(), lr=0.1), lf.Schedule().gradual_unfreeze("0", start_epoch=1))
    with caplog.at_level(logging.INFO, logger="layerfreeze"):
        made = fz.set_epoch(0) + fz.set_epoch(1)
    assert [t.action for t in made] == ["freeze", "unfreeze"]
    assert made[1].names == ("0.1.weight", "0.1.bias")
    assert made[1].trainable == 25
    messages = [r.getMessage() for r in caplog.records if r.name == "layerfreeze"]
    assert messages == [str(t) for t in made]
    assert "trainable now 25" in messages[1]


def test_upfront_registration_skipped_when_told_to_raise() -> None:
    model = stack(2)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    fz = lf.Freezer(model, opt, lf.Schedule().gradual_unfreeze("0", start_epoch=1), on_missing="raise")
    assert len(opt.param_groups) == 1
    fz.set_epoch(0)
    with pytest.raises(lf.OptimizerSyncError, match="belong to no param group"):
        fz.set_epoch(1)


def test_group_selector_errors_name_rule_and_key() -> None:
    model = stack(2)
    with pytest.raises(lf.SelectorError, match=r"rule 1 \(gradual_unfreeze\), key 'gradual_unfreeze'.*'encoder'"):
        lf.Freezer(model, None, lf.Schedule().freeze("1").gradual_unfreeze("encoder", start_epoch=1))
    with pytest.raises(lf.SelectorError, match=r"rule 0 \(progressive_freeze\), key 'progressive_freeze'\[1\]"):
        lf.Schedule().progressive_freeze(["0.0", "0.9"], start=0, end=1, total_epochs=2).validate(model)
    with pytest.raises(lf.SelectorError, match="no child modules with parameters"):
        lf.Schedule().gradual_unfreeze("1", start_epoch=0).validate(model)
    with pytest.raises(lf.ScheduleError, match="start_epoch must be an int"):
        lf.Schedule().gradual_unfreeze("0", start_epoch="2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="start_epoch must be an int"):
        lf.Schedule().gradual_unfreeze("0", start_epoch=1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- adaptive freeze


def test_adaptive_update_freezes_the_settled_bottom_prefix() -> None:
    rule = AdaptiveFreezeRule(["a", "b", "c", "d", "e"], check_every=1)
    assert rule.update([1.0, 1.0, 1.0, 1.0, 1.0]) is False  # nothing to compare with yet
    # changes 0.01, 0.02, 0.9, 0.03, 1.0: median 0.03; the prefix stops at "c"
    assert rule.update([1.01, 1.02, 1.9, 1.03, 2.0]) is True
    assert rule.frozen_groups == 2
    # a prefix never shrinks, and frozen (unmeasured) groups are not compared
    # no change anywhere: nothing is strictly below the median, nothing more freezes
    assert rule.update([None, None, 1.9, 1.03, 2.0]) is False
    assert rule.frozen_groups == 2
    assert rule.update([None, None, 1.0, 1.03, 2.5]) is False  # group "c" moved most
    assert rule.update([None, None, 1.0, 1.0, 1.0]) is True  # "c" settled: below the median
    assert rule.frozen_groups == 3


def test_adaptive_update_respects_min_trainable_and_percentile() -> None:
    rule = AdaptiveFreezeRule(["a", "b", "c", "d"], check_every=1, percentile=100, min_trainable=3)
    rule.update([1.0, 1.0, 1.0, 1.0])
    rule.update([1.0, 1.0, 1.0, 2.0])  # changes 0, 0, 0, 1: all but the top are below the max
    assert rule.frozen_groups == 1  # capped: 3 groups must stay trainable
    loose = AdaptiveFreezeRule(["a", "b", "c", "d"], check_every=1, percentile=100, min_trainable=1)
    loose.update([1.0, 1.0, 1.0, 1.0])
    loose.update([1.0, 1.0, 1.0, 2.0])
    assert loose.frozen_groups == 3
    strict = AdaptiveFreezeRule(["a", "b", "c", "d"], check_every=1, percentile=0)
    strict.update([1.0, 1.0, 1.0, 1.0])
    assert strict.update([1.5, 1.0, 1.0, 2.0]) is False  # nothing is below the minimum


def train_adaptive(min_trainable: int) -> tuple[list[int], list[lf.Transition], nn.Module]:
    model = stack(4, width=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    s = lf.Schedule().adaptive_freeze("0", check_every=3, min_trainable=min_trainable)
    fz = lf.Freezer(model, opt, s)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=gen), torch.randn(32, 1, generator=gen)
    history, made = [], []
    for epoch in range(8):
        made += fz.set_epoch(epoch)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        history.append(s.rules[0].frozen_groups)  # type: ignore[attr-defined]
    return history, made + fz.set_epoch(8), model


def test_adaptive_freeze_trains_deterministically_and_keeps_min_trainable() -> None:
    history, made, model = train_adaptive(min_trainable=2)
    again, _, _ = train_adaptive(min_trainable=2)
    assert history == again  # deterministic
    assert history == sorted(history)  # the prefix only grows
    assert history[-1] >= 1
    assert max(history) <= 2  # 4 groups, 2 always trainable
    assert frozen_layers(model) == list(range(history[-1]))  # a bottom prefix
    assert [t.action for t in made] == ["freeze"] * len({h for h in history if h})
    one, _, _ = train_adaptive(min_trainable=4)
    assert one == [0] * 8


def test_adaptive_frozen_at_answers_from_recorded_state() -> None:
    model = stack(3)
    s = lf.Schedule().adaptive_freeze("0", check_every=5)
    assert s.frozen_at(model, epoch=0) == []
    s.rules[0].load_state_dict({"frozen_groups": 2, "previous": [1.0, 1.0, 1.0], "checks": 4})
    assert s.frozen_at(model, epoch=0) == s.frozen_at(model, step=99) == ["0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"]


def test_adaptive_freeze_needs_an_optimizer() -> None:
    with pytest.raises(ValueError, match="needs the optimizer"):
        lf.Freezer(stack(2), None, lf.Schedule().adaptive_freeze("0", check_every=2))


def test_adaptive_collects_norms_without_a_second_backward() -> None:
    model = stack(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = lf.Schedule().adaptive_freeze("0", check_every=2)
    fz = lf.Freezer(model, opt, s)
    model(torch.ones(1, 4)).sum().backward()
    grads = [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in layer.parameters()])) for layer in model[0]]
    opt.step()
    collector = fz.adaptive.collectors[0][1]
    assert [float(v) for v in collector.sums] == pytest.approx([float(g) for g in grads])
    assert collector.counts == [1, 1]


# --------------------------------------------------------------------------- lr_decay on an optimizer that holds everything


def test_lr_decay_applies_when_the_optimizer_already_holds_every_parameter() -> None:
    # the common set-up: the optimizer is built from model.parameters(), so no
    # group is added for the encoder layers; they still need their own lrs
    model = stack(3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.3)
    s = lf.Schedule().gradual_unfreeze("0", start_epoch=1, lr_decay=0.5)
    fz = lf.Freezer(model, opt, s)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert [lr_of[id(model[0][i].weight)] for i in range(3)] == pytest.approx([0.025, 0.05, 0.1])
    assert lr_of[id(model[1].weight)] == 0.1
    assert all(g["weight_decay"] == 0.3 for g in opt.param_groups)  # the source group's options
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters())  # each parameter once
    fz.set_epoch(0)
    assert frozen_layers(model) == [0, 1, 2]
    fz.set_epoch(3)
    assert frozen_layers(model) == []
    # a second Freezer on the same optimizer finds every lr right and moves nothing
    fz.close()
    groups = [[id(p) for p in g["params"]] for g in opt.param_groups]
    lf.Freezer(model, opt, s)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == groups


def test_lr_decay_with_an_all_parameter_optimizer_resumes_bitwise() -> None:
    def run(epochs: range, state: dict | None = None) -> tuple[nn.Module, dict]:
        model = stack(3)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        fz = lf.Freezer(model, opt, lf.Schedule().gradual_unfreeze("0", start_epoch=1, lr_decay=0.5))
        if state is not None:
            model.load_state_dict(state["model"])
            fz.load_state_dict(state["freezer"])
            opt.load_state_dict(state["optimizer"])
        x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.ones(8, 1)
        for epoch in epochs:
            fz.set_epoch(epoch)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model, {"model": model.state_dict(), "optimizer": opt.state_dict(), "freezer": fz.state_dict()}

    full, _ = run(range(5))
    _, half = run(range(2))
    resumed, _ = run(range(2, 5), half)
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- eval holds released by a schedule


def blocks() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 4),
        nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.1), nn.BatchNorm1d(4))),
        nn.Dropout(0.2),
        nn.Linear(4, 1),
    )


@pytest.mark.parametrize(
    "schedule",
    [
        lambda: lf.Schedule().freeze("[0:2]", mode="eval", until_epoch=2),
        lambda: lf.Schedule().freeze(["0", "1"], mode="eval", until_epoch=2),
        lambda: lf.Schedule().gradual_unfreeze(["[0]", "[1]"], start_epoch=1, mode="eval"),
        lambda: lf.Schedule().freeze("[1]", mode="eval", until_step=6).freeze("1.2", mode="eval", until_epoch=2),
    ],
)
def test_eval_freeze_in_a_schedule_then_unfreeze_gives_every_module_back(schedule) -> None:
    model = blocks()
    fz = lf.Freezer(model, torch.optim.SGD(model.parameters(), lr=0.1), schedule())
    fz.set_step(0)
    fz.set_epoch(0)
    model.train()
    assert not model[1][1].training and not model[1][2][0].training  # dropout held off while frozen
    for epoch in range(1, 4):
        fz.set_step(3 * epoch)
        fz.set_epoch(epoch)
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    model.train()
    assert [n for n, m in model.named_modules() if not m.training] == []


def test_a_later_norm_rule_takes_dropout_out_of_an_earlier_eval_hold() -> None:
    # rule 1 holds block 1 in eval while it is the only rule deciding (no epoch
    # known yet); from epoch 1 rule 2, a "norm" freeze of the same block, wins:
    # only the BatchNorm stays in eval, dropout and the rest follow model.train()
    model = blocks()
    s = lf.Schedule().freeze("[1]", mode="eval", until_step=10).freeze("[1]", from_epoch=1)
    fz = lf.Freezer(model, torch.optim.SGD(model.parameters(), lr=0.1), s)
    fz.set_step(0)
    model.train()
    assert not model[1][1].training
    fz.set_epoch(1)
    model.train()
    assert [n for n, m in model.named_modules() if not m.training] == ["1.2.1"]
    assert kept_in_eval(model) == {"1.2.1": "norm"}
    assert not model[1][0].weight.requires_grad
    fz.set_step(10)
    model.train()
    assert [n for n, m in model.named_modules() if not m.training] == ["1.2.1"]


# --------------------------------------------------------------------------- one spec per rule


def test_a_rule_is_one_class_and_its_spec_drives_builder_config_and_to_dict(monkeypatch) -> None:
    from layerfreeze import rules
    from layerfreeze.selectors import resolve

    monkeypatch.setattr(rules, "RULES", dict(rules.RULES))
    import layerfreeze.config as config
    import layerfreeze.schedule as schedule_mod

    monkeypatch.setattr(config, "RULES", rules.RULES)
    monkeypatch.setattr(schedule_mod, "RULES", rules.RULES)

    @rules.register_rule
    class EveryOther(rules.Rule):
        """Frozen at even epochs."""

        kind = "every_other"
        params = (rules.Param("phase", "int", 0, low=0), rules.Param("mode", "mode", "norm"))

        def groups(self, index, *, origin):
            return [(str(self.selector), resolve(index, [self.selector], origin=origin, default_all=False))]

        def decide(self, index, epoch, step, *, origin):
            if epoch is None:
                return []
            return [rules.Decision(self.groups(index, origin=origin)[0][1], (epoch + self.phase) % 2 == 0, self.mode)]

    net = stack(2)
    built = lf.Schedule().every_other("0", phase=1)
    assert built.to_dict() == {"rules": [{"every_other": "0", "phase": 1}]}
    assert lf.Schedule.from_dict(built.to_dict()).to_dict() == built.to_dict()
    assert built.frozen_at(net, epoch=1) and not built.frozen_at(net, epoch=2)
    with pytest.raises(lf.ScheduleError, match=r"rule 0 \(every_other\), key 'phase': expected an int"):
        lf.Schedule.from_dict({"rules": [{"every_other": "0", "phase": "one"}]})
    with pytest.raises(lf.ScheduleError, match="phase must be >= 0"):
        lf.Schedule().every_other("0", phase=-1)
    with pytest.raises(lf.ScheduleTypeError, match="unexpected keyword argument 'phaze'"):
        lf.Schedule().every_other("0", phaze=1)


def test_builder_signatures_come_from_the_spec() -> None:
    import inspect

    sig = inspect.signature(lf.Schedule.gradual_unfreeze)
    assert list(sig.parameters) == ["self", "group_spec", "start_epoch", "every", "lr_decay", "mode"]
    assert sig.parameters["start_epoch"].default is inspect.Parameter.empty
    assert sig.parameters["every"].default == 1
    with pytest.raises(lf.ScheduleTypeError, match="missing the required keyword argument 'start_epoch'"):
        lf.Schedule().gradual_unfreeze("0")


# --------------------------------------------------------------------------- each rule on a BERT-shaped model


def test_gradual_unfreeze_with_lr_decay(encoder) -> None:
    m = encoder
    s = lf.Schedule().gradual_unfreeze("encoder.layer", start_epoch=1, every=2, lr_decay=0.5)
    assert s.frozen_at(m, epoch=0) == lf.select(m, "encoder")
    assert s.frozen_at(m, epoch=1) == encoder_layer(0) + encoder_layer(1) + encoder_layer(2)
    assert s.frozen_at(m, epoch=3) == encoder_layer(0) + encoder_layer(1)
    assert s.frozen_at(m, epoch=7) == []
    opt = torch.optim.SGD(m.parameters(), lr=0.8)  # every parameter already in group 0
    fz = lf.Freezer(m, opt, s)
    fz.set_epoch(7)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert [lr_of[id(m.encoder.layer[i]["attention"].weight)] for i in range(4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert lr_of[id(m.norm.weight)] == 0.8


def test_progressive_freeze_thresholds(encoder) -> None:
    m = encoder
    s = lf.Schedule().progressive_freeze("encoder.layer", start=0.5, end=0.8, total_epochs=10)
    # thresholds 0.5, 0.6, 0.7, 0.8 for the four groups, bottom first
    assert s.frozen_at(m, epoch=4) == []
    assert s.frozen_at(m, epoch=5) == encoder_layer(0)
    assert s.frozen_at(m, epoch=7) == encoder_layer(0) + encoder_layer(1) + encoder_layer(2)
    assert s.frozen_at(m, epoch=9) == lf.select(m, "encoder")
    by_step = lf.Schedule().progressive_freeze(["encoder.layer[0]", "norm"], start=0.0, end=1.0, total_steps=4)
    assert by_step.frozen_at(m, step=0) == encoder_layer(0)
    assert by_step.frozen_at(m, step=4) == encoder_layer(0) + ["norm.weight", "norm.bias"]


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


def test_an_empty_freeze_window_is_refused() -> None:
    with pytest.raises(lf.ScheduleError, match=r"from_epoch=5 is not below until_epoch=2.*never freeze"):
        lf.Schedule().freeze("fc2", from_epoch=5, until_epoch=2)
    with pytest.raises(lf.ScheduleError, match="from_step=3 is not below until_step=3"):
        lf.Schedule.from_dict({"rules": [{"freeze": "fc2", "from_step": 3, "until_step": 3}]})
