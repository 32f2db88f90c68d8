"""Gradual unfreezing (ULMFiT-style) with discriminative learning rates.

A small "pretrained" encoder of four blocks gets a new head. The head trains
alone for two epochs; then the top block unfreezes, and one more block below
it every epoch, each block training at 0.7x the lr of the block above it. An
LR scheduler made after the Freezer needs nothing extra.

Run: ``python examples/gradual_unfreeze.py [plan.png]`` (default: a temp dir).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import layerfreeze as lf


class Encoder(nn.Module):
    def __init__(self, width: int = 16, blocks: int = 4) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()) for _ in range(blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = x + block(x)
        return x


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = Model()
    schedule = lf.Schedule().gradual_unfreeze("encoder.layer", start_epoch=2, lr_decay=0.7)

    print("the plan (lr factors: each block's lr relative to the head's):")
    for row in schedule.timeline(model, epochs=7):
        lrs = ", ".join(f"{name.rsplit('.', 1)[1]}: {f:.2f}" for name, f in row.lr_scale.items())
        blocks = f"{len(row.frozen)} block{'' if len(row.frozen) == 1 else 's'}"
        print(f"  epoch {row.epoch}: trainable {row.trainable:5,}  frozen {blocks:8}  [{lrs}]")

    # the optimizer starts with the head only; the Freezer registers the
    # encoder blocks at their own lr (frozen ones are skipped by AdamW)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    freezer = lf.Freezer(model, optimizer, schedule)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=7 * 8)

    x, y = torch.randn(256, 16), torch.randn(256, 1)
    for epoch in range(7):
        freezer.set_epoch(epoch)  # logs and returns what changed
        for batch in range(8):
            xb, yb = x[batch::8], y[batch::8]
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            optimizer.step()
            scheduler.step()
        print(f"epoch {epoch}: loss {loss.item():.4f}, trainable {lf.count_parameters(model).trainable:,}")

    path = lf.plot_timeline(schedule, model, epochs=7, path=out, title="gradual_unfreeze('encoder.layer', start_epoch=2, lr_decay=0.7)")
    print(f"wrote {path}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "gradual_unfreeze.png"
    main(target)
