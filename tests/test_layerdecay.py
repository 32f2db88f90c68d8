"""Layer-wise lr decay with nothing frozen, alone and under schedules and trainers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.conftest import sibling, stack
from torch import nn
from torch.optim import lr_scheduler as sched

import layerfreeze as lf


def _lr_of(opt: torch.optim.Optimizer, p: nn.Parameter) -> float:
    return next(g["lr"] for g in opt.param_groups if any(q is p for q in g["params"]))


@pytest.mark.parametrize("groups", ["0", ["0.0", "0.1", "0.2"]], ids=["container", "list"])
def test_group_k_below_the_top_trains_at_lr_decay_k(groups: object) -> None:
    net = stack()
    opt = torch.optim.AdamW(lf.layer_decay_groups(net, groups, lr=1e-2, decay=0.5, weight_decay=0.1))
    assert _lr_of(opt, net[1].weight) == 1e-2
    assert [_lr_of(opt, net[0][i].weight) for i in (2, 1, 0)] == [1e-2, 5e-3, 2.5e-3]
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


def test_bad_arguments_are_refused() -> None:
    net = stack()
    with pytest.raises(lf.ArgumentError, match="decay must be a number in"):
        lf.layer_decay_groups(net, "0", lr=1e-2, decay=0.0)
    with pytest.raises(lf.ArgumentError, match="lr must be a finite non-negative number"):
        lf.layer_decay_groups(net, "0", lr=float("nan"), decay=0.5)
    with pytest.raises(lf.SelectorError, match="encoder"):
        lf.layer_decay_groups(net, "encoder", lr=1e-2, decay=0.5)


def test_a_schedule_keeps_the_decayed_lrs_under_a_scheduler_and_a_warmup() -> None:
    net = stack()
    opt = torch.optim.SGD(lf.layer_decay_groups(net, "0", lr=0.1, decay=0.5), lr=0.1)
    fz = lf.Freezer(net, opt, lf.Schedule().freeze("0", until_epoch=1), warmup=lf.Warmup(epochs=2, start=0.5))
    s = sched.StepLR(opt, step_size=2, gamma=0.5)
    assert len(opt.param_groups) == 4  # nothing moved: each group already has its lr
    seen: list[list[float]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
    x = torch.randn(8, 4)
    for epoch in range(4):
        fz.set_epoch(epoch)
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        s.step()
    ramps = [1.0, 0.5, 0.75, 1.0]
    for epoch, lrs in enumerate(seen):
        factor = 0.5 ** (epoch // 2)
        assert lrs[0] == pytest.approx(0.1 * factor)
        if epoch >= 1:
            assert lrs[1:] == pytest.approx([0.1 * f * factor * ramps[epoch] for f in (1, 0.5, 0.25)])



def test_in_lightning() -> None:
    pytest.importorskip("lightning.pytorch")
    lt = sibling("test_lightning")
    from layerfreeze.lightning import LayerFreeze

    class Decayed(lt.Module):  # type: ignore[misc,name-defined]
        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(lf.layer_decay_groups(self, "backbone", lr=0.05, decay=0.5))

    module = Decayed()
    trainer = lt._trainer(2, [LayerFreeze(lf.Schedule().freeze("backbone", until_epoch=1))])
    trainer.fit(module, lt._loader())
    opt = trainer.optimizers[0]
    assert module.backbone_trains == {0: False, 1: True}
    assert [_lr_of(opt, p) for p in (module.head.weight, module.backbone[2].weight, module.backbone[0].weight)] \
        == [0.05, 0.05, 0.025]


def test_in_the_hf_trainer(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    hf = sibling("test_transformers_callback")
    from layerfreeze.transformers import LayerFreezeCallback

    model = hf._model()
    opt = torch.optim.AdamW(lf.layer_decay_groups(model, "bert.encoder.layer", lr=1e-2, decay=0.5))
    cb = LayerFreezeCallback(lf.Schedule().freeze("bert.encoder", until_epoch=1))
    trainer = transformers.Trainer(model=model, args=hf._args(tmp_path), train_dataset=hf._data(),
                                   callbacks=[cb], optimizers=(opt, None))
    trainer.train()
    layer = model.bert.encoder.layer
    bases = [next(g["initial_lr"] for g in opt.param_groups if any(q is p for q in g["params"]))
             for p in (model.classifier.weight, layer[1].output.dense.weight, layer[0].output.dense.weight)]
    assert bases == [1e-2, 1e-2, 5e-3]
    assert [t.action for t in cb.transitions] == ["freeze", "unfreeze"]
