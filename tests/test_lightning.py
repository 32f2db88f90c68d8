"""The Lightning callback: schedule applied, optimizers in sync, resume continues."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import layerfreeze as lf

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import BackboneFinetuning  # noqa: E402

from layerfreeze.lightning import LayerFreeze  # noqa: E402


class Module(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, trainable_only: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 1)
        self.trainable_only = trainable_only
        #: requires_grad of the backbone at each epoch start, by epoch
        self.backbone_trains: dict[int, bool] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx == 0:
            self.backbone_trains[self.current_epoch] = self.backbone[0].weight.requires_grad
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad] if self.trainable_only else self.parameters()
        opt = torch.optim.AdamW(params, lr=0.05)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


def _loader() -> Any:
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)


def _trainer(max_epochs: int, callbacks: list[Any]) -> Any:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
    )


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _schedule() -> lf.Schedule:
    # backbone frozen for epochs 0-1; the head paused for steps 5-6 (2 steps an epoch)
    return lf.Schedule().freeze("backbone", until_epoch=2).freeze("head", from_step=5, until_step=7)


def test_plain_backbone_finetuning_loses_the_unfreeze_on_resume(tmp_path: Any) -> None:
    straight = Module()
    _trainer(4, [BackboneFinetuning(unfreeze_backbone_at_epoch=2)]).fit(straight, _loader())
    assert straight.backbone_trains == {0: False, 1: False, 2: True, 3: True}

    first = Module()
    trainer = _trainer(3, [BackboneFinetuning(unfreeze_backbone_at_epoch=2)])
    trainer.fit(first, _loader())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = Module()
    _trainer(4, [BackboneFinetuning(unfreeze_backbone_at_epoch=2)]).fit(
        resumed, _loader(), ckpt_path=tmp_path / "mid.ckpt"
    )
    # the trap: after resuming, the backbone is frozen again for good
    assert resumed.backbone_trains == {3: False}


@pytest.mark.parametrize("trainable_only", [True, False])
def test_schedule_runs_and_unfrozen_backbone_trains(trainable_only: bool) -> None:
    module = Module(trainable_only=trainable_only)
    init = _params(module)
    cb = LayerFreeze(_schedule())
    trainer = _trainer(4, [cb])
    trainer.fit(module, _loader())
    assert module.backbone_trains == {0: False, 1: False, 2: True, 3: True}
    assert not torch.equal(module.backbone[0].weight, init["backbone.0.weight"])
    actions = [(t.action, t.epoch, t.step) for t in cb.transitions]
    assert actions == [
        ("freeze", 0, 0),
        ("unfreeze", 2, 4),
        ("freeze", 2, 5),
        ("unfreeze", 3, 7),
    ]
    opt = trainer.optimizers[0]
    assert len(opt.param_groups) == 1  # everything registered once, no group added
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)  # StepLR kept working


def _probe_frozen_weights(module: Module) -> dict[str, torch.Tensor]:
    return {"backbone": module.backbone[0].weight.detach().clone()}


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resume_in_the_middle_of_the_schedule_continues_it(tmp_path: Any, stop_after: int) -> None:
    straight = Module()
    _trainer(4, [LayerFreeze(_schedule())]).fit(straight, _loader())

    first = Module()
    trainer = _trainer(stop_after, [LayerFreeze(_schedule())])
    trainer.fit(first, _loader())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("LayerFreeze"))
    assert saved["freezer"]["epoch"] == stop_after - 1

    resumed = Module()
    _trainer(4, [LayerFreeze(_schedule())]).fit(resumed, _loader(), ckpt_path=tmp_path / "mid.ckpt")
    expected = {e: e >= 2 for e in range(stop_after, 4)}
    assert resumed.backbone_trains == expected
    for name, p in resumed.named_parameters():
        assert torch.equal(p, dict(straight.named_parameters())[name]), name  # bitwise


def test_callback_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="schedule must be a layerfreeze Schedule"):
        LayerFreeze({"rules": []})  # type: ignore[arg-type]
    cb = LayerFreeze(lf.Schedule().freeze("backbonee", until_epoch=1))
    with pytest.raises(lf.SelectorError, match="backbonee"):
        _trainer(1, [cb]).fit(Module(), _loader())


def _lr_schedule() -> lf.Schedule:
    return lf.Schedule().gradual_unfreeze("backbone", start_epoch=1, lr_decay=0.5)


@pytest.mark.parametrize("kwargs", [{}, {"unfreeze_lr": 0.01}], ids=["lr_decay", "lr_decay+unfreeze_lr"])
@pytest.mark.parametrize("trainable_only", [True, False])
def test_resume_with_lr_decay_keeps_groups_and_lrs(tmp_path: Any, kwargs: dict, trainable_only: bool) -> None:
    straight = Module(trainable_only)
    s_trainer = _trainer(4, [LayerFreeze(_lr_schedule(), **kwargs)])
    s_trainer.fit(straight, _loader())

    first = Module(trainable_only)
    trainer = _trainer(2, [LayerFreeze(_lr_schedule(), **kwargs)])
    trainer.fit(first, _loader())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    resumed = Module(trainable_only)
    r_trainer = _trainer(4, [LayerFreeze(_lr_schedule(), **kwargs)])
    r_trainer.fit(resumed, _loader(), ckpt_path=tmp_path / "mid.ckpt")  # no ValueError on param groups
    assert resumed.backbone_trains == {e: straight.backbone_trains[e] for e in (2, 3)}
    layout = [(len(g["params"]), g["lr"]) for g in s_trainer.optimizers[0].param_groups]
    assert [(len(g["params"]), g["lr"]) for g in r_trainer.optimizers[0].param_groups] == layout
    for name, p in resumed.named_parameters():
        assert torch.equal(p, dict(straight.named_parameters())[name]), name  # bitwise


def test_unfreeze_lr_is_the_backbone_base_lr() -> None:
    module = Module(trainable_only=False)
    trainer = _trainer(3, [LayerFreeze(lf.Schedule().freeze("backbone", until_epoch=1), unfreeze_lr=0.005)])
    trainer.fit(module, _loader())
    opt = trainer.optimizers[0]
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    # StepLR(step_size=2, gamma=0.5) stepped after each of 3 epochs: both at their base times 0.5
    assert lrs[id(module.backbone[0].weight)] == pytest.approx(0.005 * 0.5)
    assert lrs[id(module.head.weight)] == pytest.approx(0.05 * 0.5)


def test_lightning_callback_takes_freezer_kwargs() -> None:
    class HeadOnly(pl.LightningModule):  # type: ignore[misc]
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

    module = HeadOnly()
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
