"""Seeing what trains: parameter counts and a module table."""

from __future__ import annotations

import io
from typing import NamedTuple

from torch import nn

from .errors import ArgumentError
from .holds import keeper as _keeper
from .rules import as_int
from .selectors import ModelIndex

__all__ = ["ParamCount", "count_parameters", "summary"]


class ParamCount(NamedTuple):
    """Scalar parameter counts; a shared (tied) parameter is counted once."""

    trainable: int
    frozen: int
    total: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {pct:.2f}"


def count_parameters(model: nn.Module) -> ParamCount:
    """Count trainable, frozen and all scalar parameters, each tensor once.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Linear(10, 3)
        >>> _ = lf.freeze(net, "bias")
        >>> lf.count_parameters(net)
        ParamCount(trainable=30, frozen=3, total=33)
    """
    index = ModelIndex(model)
    trainable = frozen = 0
    for p in index.by_canonical.values():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return ParamCount(trainable, frozen, trainable + frozen)


def _mode(module: nn.Module) -> str:
    keeper = _keeper(module)
    if keeper is not None:
        return f"eval (held: {keeper.mode})"
    return "train" if module.training else "eval"


def summary(model: nn.Module, depth: int = 2) -> str:
    """A table of modules down to ``depth`` levels with their parameter counts,
    trainable and frozen, and mode, followed by a totals line such as
    ``trainable params: 61 || all params: 73 || trainable%: 83.56``.

    Shared parameters are counted once, at the first module that holds them.
    Needs ``rich`` (``pip install 'layerfreeze[report]'``).
    """
    level = as_int(depth)
    if level is None or level < 0:
        raise ArgumentError(f"depth must be a non-negative int, got {depth!r}; depth=0 shows the model alone")
    depth = level
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lf.summary needs rich: pip install 'layerfreeze[report]'") from exc

    index = ModelIndex(model)
    table = Table(title=f"{type(index.model).__name__}", title_justify="left")
    for col, justify in (("module", "left"), ("type", "left"), ("parameters", "right"),
                         ("trainable", "right"), ("frozen", "right"), ("mode", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    # a shared parameter belongs to the first module that registers it; other
    # modules holding it leave it out, so child rows add up to their parent
    owner: dict[int, str] = {}
    for name, module in index.model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), name)
    for name, module in index.model.named_modules():
        level = 0 if name == "" else name.count(".") + 1
        if level > depth:
            continue
        trainable = frozen = 0
        for p in module.parameters():
            home = owner[id(p)]
            if name and home != name and not home.startswith(name + "."):
                continue
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
        label = "  " * level + (name.rpartition(".")[2] if name else "(model)")
        table.add_row(label, type(module).__name__, f"{trainable + frozen:,}", f"{trainable:,}",
                      f"{frozen:,}", _mode(module))
    buf = io.StringIO()
    console = Console(file=buf, width=120, color_system=None, force_terminal=False)
    console.print(table)
    console.print(str(count_parameters(index.model)))
    return buf.getvalue()
