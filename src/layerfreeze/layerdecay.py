"""Layer-wise lr decay with nothing frozen: param groups whose lr falls going down.

:func:`layer_decay_groups` builds an optimizer's param groups from groups of
layers given as :meth:`layerfreeze.Schedule.gradual_unfreeze` takes them: the
top group trains at ``lr``, the group ``k`` places below it at
``lr * decay**k``, and every parameter outside the groups (a head) at ``lr``.
The groups are plain param groups, so they work with any optimizer, LR
scheduler and trainer, and a :class:`~layerfreeze.Freezer` keeps them: a
parameter unfrozen later trains at its group's lr (the lr contract), also
under a warm-up.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import ArgumentError
from .lrsched import check_lr
from .rules import GradualUnfreezeRule, as_number
from .selectors import ModelIndex, unwrap

__all__ = ["layer_decay_groups"]


def layer_decay_groups(
    model: nn.Module, groups: object, *, lr: float, decay: float, **options: Any
) -> list[dict[str, Any]]:
    """Param groups for layer-wise lr decay.

    Args:
        model: the model (a DDP or compiled wrapper is looked through).
        groups: a selector of a container whose children are the groups
            (``"encoder.layer"``), or a list of selectors, bottom first.
        lr: the top group's lr (and that of parameters outside the groups).
        decay: the factor per group going down, in (0, 1].
        **options: other options of every group (``weight_decay``, ...).

    Returns:
        Param groups, parameters outside the groups first (when there are
        any), then the groups from the top down; each has ``params`` and
        ``lr``.

    Raises:
        ArgumentError: a bad ``lr`` or ``decay``.
        SelectorError: ``groups`` does not fit the model.

    Example:
        >>> import torch, torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))
        >>> opt = torch.optim.AdamW(lf.layer_decay_groups(net, "0", lr=1e-3, decay=0.5))
        >>> [g["lr"] for g in opt.param_groups]
        [0.001, 0.001, 0.0005]
    """
    lr = check_lr("lr", lr)
    d = as_number(decay)
    if d is None or not 0.0 < d <= 1.0:
        raise ArgumentError(f"decay must be a number in (0, 1], got {decay!r}")
    index = ModelIndex(unwrap(model))
    rule = GradualUnfreezeRule(groups, start_epoch=0, lr_decay=d)
    found = rule.groups(index, origin="layer_decay_groups")
    taken: set[str] = set()
    layered: list[dict[str, Any]] = []
    for k, (_, res) in enumerate(reversed(found)):
        names = [n for n in res.params if n not in taken]
        taken.update(names)
        if names:
            layered.append({**options, "params": [index.by_canonical[n] for n in names], "lr": lr * d**k})
    rest = [p for n, p in index.by_canonical.items() if n not in taken]
    return ([{**options, "params": rest, "lr": lr}] if rest else []) + layered
