"""The seed experiment: freeze the 2nd layer of a toy net for three epochs.

A five-layer linear net (10-3-3-3-3-1) gets "pretrained" values in ``fc2``
and trains on one random input and target with Adam (lr 0.1) and MSE for nine
epochs. ``fc2`` is frozen in epochs 1-3 and trains from epoch 4, through one
schedule rule::

    fz = lf.Freezer(net, optimizer, lf.Schedule().freeze("fc2", until_epoch=4))
    for epoch in range(1, 10):
        fz.set_epoch(epoch)
        ...

The demo prints, per epoch, the trainable count (61, then 73) and ``fc2``'s
values, then checks by bitwise comparison that ``fc2`` did not move while
frozen and moved once unfrozen, for several optimizer set-ups, and the same
set-ups trained the plain-PyTorch way (``requires_grad`` flipped by hand) for
contrast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import layerfreeze as lf

__all__ = ["EpochRecord", "SeedNet", "VARIANTS", "Variant", "build", "main", "run", "verdict"]

#: the first epoch at which fc2 trains
UNFREEZE_EPOCH = 4


class SeedNet(nn.Module):
    """The toy feed-forward net of the seed experiment: 10-3-3-3-3-1, 73 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 3)
        self.fc2 = nn.Linear(3, 3)
        self.fc3 = nn.Linear(3, 3)
        self.fc4 = nn.Linear(3, 3)
        self.fc5 = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc5(self.fc4(self.fc3(self.fc2(self.fc1(x)))))


@dataclass(frozen=True)
class Variant:
    """One way a user might set up the optimizer around the freeze.

    Attributes:
        label: a short description for the output.
        optimizer: ``"adam"`` or ``"adamw"``.
        weight_decay: the optimizer's weight decay.
        trainable_only: build the optimizer from the trainable parameters only,
            after ``fc2`` is frozen (the seed's commented-out alternative).
        set_to_none: the argument given to ``optimizer.zero_grad``.
        warmup: run one backward pass before training (a gradient sanity
            check), which leaves a ``.grad`` on every parameter, ``fc2`` included.
    """

    label: str
    optimizer: str = "adam"
    weight_decay: float = 0.0
    trainable_only: bool = False
    set_to_none: bool = True
    warmup: bool = False


#: the set-ups the demo's final check runs; the first is the seed's own
VARIANTS: tuple[Variant, ...] = (
    Variant("Adam over all parameters"),
    Variant("Adam over the trainable parameters only", trainable_only=True),
    Variant(
        "AdamW(weight_decay=0.1), zero_grad(set_to_none=False), stale grads from a check pass",
        optimizer="adamw",
        weight_decay=0.1,
        set_to_none=False,
        warmup=True,
    ),
)


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch of the seed experiment left behind.

    Attributes:
        epoch: the epoch, from 1.
        trainable: trainable scalar parameters during the epoch.
        fc2_weight, fc2_bias: copies of ``fc2``'s values after the epoch's step.
        unchanged: ``fc2`` is bitwise equal to its pretrained values.
        moved: ``fc2`` differs from its values before this epoch's step.
        loss: the epoch's loss, before the step.
        transitions: what the schedule froze or unfroze at this epoch.
    """

    epoch: int
    trainable: int
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor
    unchanged: bool
    moved: bool
    loss: float
    transitions: tuple[str, ...] = ()


def build(seed: int = 0) -> tuple[SeedNet, torch.Tensor, torch.Tensor]:
    """The net with ``fc2`` loaded with "pretrained" values, and one (input, target).

    Uses the global RNG seeded with ``seed``; call it inside
    ``torch.random.fork_rng`` to leave the caller's RNG alone.
    """
    torch.manual_seed(seed)
    net = SeedNet()
    with torch.no_grad():  # stand-in for loading a checkpoint into fc2
        net.fc2.weight.copy_(torch.rand(3, 3))
        net.fc2.bias.copy_(torch.rand(3))
    return net, torch.randn(10), torch.randn(1)


def _make_optimizer(net: nn.Module, variant: Variant) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad] if variant.trainable_only else list(net.parameters())
    if variant.optimizer == "adam":
        return torch.optim.Adam(params, lr=0.1, weight_decay=variant.weight_decay)
    if variant.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=0.1, weight_decay=variant.weight_decay)
    raise ValueError(f"optimizer={variant.optimizer!r} is not 'adam' or 'adamw'")


def _plain_set_epoch(net: nn.Module, epoch: int) -> None:
    # The seed's own loop: flip requires_grad by hand, nothing else.
    for name, param in net.named_parameters():
        param.requires_grad = not (epoch < UNFREEZE_EPOCH and name.startswith("fc2."))


def run(
    variant: Variant = VARIANTS[0], *, plain: bool = False, epochs: int = 9, seed: int = 0
) -> list[EpochRecord]:
    """Train the seed net and record each epoch.

    Args:
        variant: how the optimizer is set up (see :data:`VARIANTS`).
        plain: freeze the plain-PyTorch way (the seed's loop) instead of
            with a :class:`layerfreeze.Freezer`, for contrast.
        epochs: epochs to train (each is one step on the same example).
        seed: seeds the net, the pretrained values and the data. The caller's
            RNG state is left as it was.

    Returns:
        One :class:`EpochRecord` per epoch, from epoch 1.

    Raises:
        ValueError: ``epochs`` is not positive, or the variant names an
            unknown optimizer.

    Example:
        >>> from layerfreeze.demos.seed import run
        >>> [r.trainable for r in run(epochs=5)]
        [61, 61, 61, 73, 73]
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    with torch.random.fork_rng(devices=[]):
        net, x, target = build(seed)
        pretrained = [p.detach().clone() for p in net.fc2.parameters()]
        if variant.warmup:
            nn.functional.mse_loss(net(x), target).backward()
        freezer: lf.Freezer | None = None
        if variant.trainable_only:
            # An optimizer built from what trains now: fc2 must be frozen first.
            if plain:
                _plain_set_epoch(net, 1)
            else:
                lf.freeze(net, "fc2")
        optimizer = _make_optimizer(net, variant)
        if not plain:
            schedule = lf.Schedule().freeze("fc2", until_epoch=UNFREEZE_EPOCH)
            freezer = lf.Freezer(net, optimizer, schedule)
        records = []
        try:
            for epoch in range(1, epochs + 1):
                optimizer.zero_grad(set_to_none=variant.set_to_none)
                if freezer is not None:
                    transitions = tuple(str(t) for t in freezer.set_epoch(epoch))
                else:
                    _plain_set_epoch(net, epoch)
                    transitions = ()
                trainable = lf.count_parameters(net).trainable
                before = [p.detach().clone() for p in net.fc2.parameters()]
                loss = nn.functional.mse_loss(net(x), target)
                loss.backward()
                optimizer.step()
                after = [p.detach().clone() for p in net.fc2.parameters()]
                records.append(
                    EpochRecord(
                        epoch=epoch,
                        trainable=trainable,
                        fc2_weight=after[0],
                        fc2_bias=after[1],
                        unchanged=all(torch.equal(a, b) for a, b in zip(after, pretrained, strict=True)),
                        moved=not all(torch.equal(a, b) for a, b in zip(after, before, strict=True)),
                        loss=loss.item(),
                        transitions=transitions,
                    )
                )
        finally:
            if freezer is not None:
                freezer.close()
    return records


def _span(epochs: Sequence[int]) -> str:
    if not epochs:
        return "no epoch"
    if list(epochs) == list(range(epochs[0], epochs[-1] + 1)) and len(epochs) > 1:
        return f"epochs {epochs[0]}-{epochs[-1]}"
    return ("epoch " if len(epochs) == 1 else "epochs ") + ", ".join(map(str, epochs))


def verdict(records: Sequence[EpochRecord], unfreeze_epoch: int = UNFREEZE_EPOCH) -> tuple[bool, str]:
    """Judge a run from its records: did ``fc2`` hold while frozen and move after?

    Args:
        records: what :func:`run` returned.
        unfreeze_epoch: the first epoch at which ``fc2`` should train.

    Returns:
        ``(ok, sentence)``: ``ok`` is true when ``fc2`` was bitwise equal to
        its pretrained values after every epoch before ``unfreeze_epoch`` and
        changed in every epoch from it on; the sentence says what happened.

    Example:
        >>> from layerfreeze.demos.seed import run, verdict
        >>> verdict(run())[1]
        'fc2 stayed bitwise unchanged in epochs 1-3 and moved in every epoch from epoch 4 on.'
    """
    frozen = [r for r in records if r.epoch < unfreeze_epoch]
    trained = [r for r in records if r.epoch >= unfreeze_epoch]
    held = [r.epoch for r in frozen if r.unchanged]
    slipped = [r.epoch for r in frozen if not r.unchanged]
    moved = [r.epoch for r in trained if r.moved]
    stuck = [r.epoch for r in trained if not r.moved]
    parts = []
    if held and not slipped:
        parts.append(f"fc2 stayed bitwise unchanged in {_span(held)}")
    elif slipped:
        parts.append(f"fc2 changed while frozen, in {_span(slipped)}")
    if trained and not stuck:
        parts.append(f"moved in every epoch from epoch {trained[0].epoch} on")
    elif stuck:
        parts.append(f"did not move in {_span(stuck)} although trainable")
    ok = bool(frozen) and bool(trained) and not slipped and not stuck and bool(moved)
    return ok, " and ".join(parts) + "."


def _fmt(t: torch.Tensor) -> str:
    # one line per output unit: a weight row, or a single bias value
    rows = t.reshape(t.shape[0], -1)
    return "\n".join(" ".join(f"{v:7.4f}" for v in row.tolist()) for row in rows)


def main() -> int:
    """Print the seed experiment and the final check; return 0 when every
    layerfreeze run held ``fc2`` while frozen and trained it afterwards, else 1."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    net, _, _ = build()
    console.print(lf.summary(net, depth=1), end="")
    pre = Table(title="fc2 loaded with pretrained values", title_justify="left")
    pre.add_column("fc2.weight", no_wrap=True)
    pre.add_column("fc2.bias", no_wrap=True)
    pre.add_row(_fmt(net.fc2.weight.detach()), _fmt(net.fc2.bias.detach()))
    console.print(pre)

    records = run()
    table = Table(title="Seed experiment: fc2 frozen in epochs 1-3 (Adam, lr 0.1, MSE)", title_justify="left")
    for col, justify in (("epoch", "right"), ("trainable", "right"), ("fc2.weight", "left"),
                         ("fc2.bias", "left"), ("fc2 vs pretrained", "left"), ("loss", "right")):
        table.add_column(col, justify=justify, no_wrap=col.startswith("fc2."))  # type: ignore[arg-type]
    for r in records:
        state = "bitwise unchanged" if r.unchanged else "moved"
        table.add_row(str(r.epoch), str(r.trainable), _fmt(r.fc2_weight), _fmt(r.fc2_bias), state,
                      f"{r.loss:.4f}", end_section=r.epoch < len(records))
    console.print(table)
    for r in records:
        for t in r.transitions:
            console.print(f"  schedule: {t}")
    ok, sentence = verdict(records)
    console.print(f"[bold]{sentence}[/bold]")

    check = Table(title="Final check: the same run, three optimizer set-ups", title_justify="left")
    check.add_column("optimizer set-up", overflow="fold")
    check.add_column("with layerfreeze")
    check.add_column("plain PyTorch (requires_grad by hand)")
    all_ok = ok
    for variant in VARIANTS:
        lf_ok, lf_text = verdict(run(variant))
        plain_ok, plain_text = verdict(run(variant, plain=True))
        all_ok = all_ok and lf_ok
        check.add_row(variant.label, ("ok: " if lf_ok else "FAILED: ") + lf_text,
                      ("ok: " if plain_ok else "broken: ") + plain_text)
    console.print(check)
    if all_ok:
        console.print("[bold]With layerfreeze, fc2 held while frozen and trained after, in every set-up.[/bold]")
    else:
        console.print("[bold red]layerfreeze did not hold fc2 in every set-up: this is a bug.[/bold red]")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
