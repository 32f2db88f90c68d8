"""Metric-driven unfreezing: unfreeze_on_plateau, report(), restore_best, resume, trainers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.conftest import sibling, stack
from torch import nn

import layerfreeze as lf


def _trainable_layers(net: nn.Sequential) -> list[bool]:
    return [layer.weight.requires_grad for layer in net[0]]


def test_each_plateau_unfreezes_the_next_group_from_the_top() -> None:
    net = stack()
    opt = torch.optim.SGD(net[1].parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, lf.Schedule().unfreeze_on_plateau("0", monitor="loss", patience=2, lr_decay=0.5))
    fz.set_epoch(0)
    assert _trainable_layers(net) == [False, False, False]
    assert len(opt.param_groups) == 4  # every group registered up front, at its lr
    seen = []
    for value in (1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.75, 0.75, 0.9):
        made = fz.report(loss=value, other=3.0)
        seen.append(_trainable_layers(net))
        if made:
            assert made[0].action == "unfreeze"
    assert seen[2] == [False, False, False]
    assert seen[3] == [False, False, True]  # 0.9, 0.85: two reports without a new best
    assert seen[5] == [False, False, True]
    assert seen[6] == [False, True, True]
    assert seen[8] == [True, True, True]
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert [lrs[id(layer.weight)] for layer in net[0]] == pytest.approx([0.025, 0.05, 0.1])
    assert fz.report(accuracy=0.5) == []  # a metric no rule monitors changes nothing


def test_restore_best_loads_the_best_weights_before_the_unfreeze() -> None:
    net = stack()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, lf.Schedule().unfreeze_on_plateau("0", monitor="acc", maximize=True,
                                                                restore_best=True))
    fz.set_epoch(0)
    x = torch.randn(8, 4)

    def train() -> None:
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()

    train()
    fz.report(acc=torch.tensor(0.7))  # best: these weights
    best = {k: v.clone() for k, v in net.state_dict().items()}
    train()
    made = fz.report(acc=0.6)  # patience 1: unfreeze, after going back to the best weights
    assert [t.action for t in made] == ["unfreeze"]
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, best[k], rtol=0, atol=0)
    train()  # the guard took the loaded values as the reference: no FrozenParameterChanged
    assert not torch.equal(net[1].weight, best["1.weight"])  # and the step trained on from them


def test_state_resumes_and_bad_input_is_refused() -> None:
    def make() -> tuple[nn.Sequential, lf.Freezer]:
        net = stack()
        sched = lf.Schedule().unfreeze_on_plateau("0", monitor="loss", patience=2)
        return net, lf.Freezer(net, torch.optim.SGD(net.parameters(), lr=0.1), sched)

    net, fz = make()
    fz.set_epoch(0)
    for v in (1.0, 1.1, 1.2, 0.9, 0.95):
        fz.report(loss=v)
    state = fz.state_dict()
    net2, fz2 = make()
    fz2.load_state_dict(state)
    assert _trainable_layers(net2) == _trainable_layers(net) == [False, False, True]
    fz.report(loss=0.96)
    fz2.report(loss=0.96)  # the count (one bad report) came along: both unfreeze now
    assert _trainable_layers(net2) == _trainable_layers(net) == [False, True, True]
    with pytest.raises(lf.ArgumentError, match=r"report\(loss=...\) must be a number"):
        fz.report(loss="low")
    with pytest.raises(lf.ScheduleTypeError, match="maximize must be true or false"):
        lf.Schedule().unfreeze_on_plateau("0", monitor="loss", maximize="yes")
    with pytest.raises(lf.ScheduleTypeError, match="monitor"):
        lf.Schedule().unfreeze_on_plateau("0", patience=2)
    again = lf.Schedule.from_dict(lf.Schedule().unfreeze_on_plateau("0", monitor="loss", patience=3).to_dict())
    assert again.rules[0].patience == 3



def test_lightning_feeds_validation_metrics(tmp_path: Any) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    lt = sibling("test_lightning")
    from layerfreeze.lightning import LayerFreeze

    class Validated(lt.Module):  # type: ignore[misc,name-defined]
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", torch.tensor(1.0))  # never improves

    def fit(module: Any, epochs: int, ckpt: Any = None) -> Any:
        cb = LayerFreeze(lf.Schedule().unfreeze_on_plateau("backbone", monitor="val_loss", patience=1))
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[cb], num_sanity_val_steps=0)
        trainer.fit(module, lt._loader(), lt._loader(), ckpt_path=ckpt)
        return trainer, cb

    module = Validated()
    trainer, cb = fit(module, 3)
    # epoch 0 sets the best; each later evaluation is a plateau: one more group each,
    # the top one (backbone.2) after epoch 1, the bottom one (backbone.0) after epoch 2
    assert module.backbone_trains == {0: False, 1: False, 2: False}
    assert [(t.action, t.names[0]) for t in cb.transitions] == [
        ("freeze", "backbone.0.weight"), ("unfreeze", "backbone.2.weight"), ("unfreeze", "backbone.0.weight")
    ]
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    resumed = Validated()
    _, cb2 = fit(resumed, 4, tmp_path / "end.ckpt")
    assert resumed.backbone_trains == {3: True}


def test_hf_trainer_feeds_evaluation_metrics(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    hf = sibling("test_transformers_callback")
    from layerfreeze.transformers import LayerFreezeCallback

    model = hf._model()
    args = hf._args(tmp_path, epochs=3)
    args.eval_strategy = "epoch"
    cb = LayerFreezeCallback(lf.Schedule().unfreeze_on_plateau("bert.encoder.layer", monitor="eval_loss",
                                                               patience=1, min_delta=10.0))
    transformers.Trainer(model=model, args=args, train_dataset=hf._data(), eval_dataset=hf._data(8),
                         callbacks=[cb]).train()
    # min_delta=10: no evaluation after the first counts as better
    assert [t.action for t in cb.transitions] == ["freeze", "unfreeze", "unfreeze"]
    assert model.bert.encoder.layer[0].output.dense.weight.requires_grad
