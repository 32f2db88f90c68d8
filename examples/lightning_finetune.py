"""Backbone fine-tuning with Lightning, stopped and resumed mid-schedule.

The backbone is frozen for epochs 0-1 and trains from epoch 2. Training
stops after epoch 1, is resumed from the checkpoint, and ends bitwise equal to
an uninterrupted run: the callback's state travels in the checkpoint.

    python examples/lightning_finetune.py
    python examples/lightning_finetune.py --ddp   # Trainer(strategy="ddp_spawn"), 2 CPU processes
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import layerfreeze as lf
from layerfreeze.lightning import LayerFreeze


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        # the common pattern that alone would never train a later-unfrozen backbone
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=32)


def fit(epochs: int, ckpt: Path | None = None, save: Path | None = None, ddp: bool = False) -> Regressor:
    module = Regressor()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=2 if ddp else 1,
        strategy="ddp_spawn" if ddp else "auto", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        callbacks=[LayerFreeze(lf.Schedule().freeze("backbone", until_epoch=2))],
    )
    trainer.fit(module, loader(), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ddp", action="store_true", help="train with strategy='ddp_spawn' on 2 CPU processes")
    args = parser.parse_args()
    if args.ddp:
        module = fit(4, ddp=True)
        print("ddp_spawn run finished; backbone trainable:", module.backbone[0].weight.requires_grad)
        return
    straight = fit(4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mid.ckpt"
        fit(2, save=path)
        resumed = fit(4, ckpt=path)
    same = all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))
    print(f"resumed run bitwise equal to the uninterrupted one: {same}")


if __name__ == "__main__":
    main()
