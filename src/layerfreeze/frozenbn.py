"""Frozen BatchNorm as a fixed affine map, and back.

:func:`freeze_batchnorm` replaces the BatchNorm layers of a selection by
:class:`FrozenBatchNorm` modules (what torchvision's ``FrozenBatchNorm2d`` and
timm's ``freeze_batch_norm_2d`` do): the output is ``(x - mean) / sqrt(var +
eps) * weight + bias`` with the stored statistics, whatever ``train()`` or
``eval()`` says and whatever an optimizer does, and no statistics are
updated. The very same parameter and buffer tensors move into the new
module, so optimizers, fingerprints and checkpoints keep referring to them,
and the state dict keys are unchanged: a state dict loads into either form.
The parameters are frozen through the freeze road (a Freezer's optimizer and
guard follow). :func:`unfreeze_batchnorm` puts back the original layers.

Replace modules before a DDP or ``torch.compile`` wrapper is made (or
compile again afterwards): a wrapper made earlier keeps the old modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .core import apply_change
from .holds import release
from .selectors import ModelIndex, resolve, unwrap

__all__ = ["FrozenBatchNorm", "freeze_batchnorm", "unfreeze_batchnorm"]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class FrozenBatchNorm(nn.Module):
    """A BatchNorm layer with fixed statistics and affine parameters.

    Args:
        bn: a ``BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``) that tracks running
            statistics; its parameters and buffers are taken over, not copied.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3).eval()
        >>> frozen = FrozenBatchNorm(bn)
        >>> x = torch.randn(4, 3)
        >>> torch.equal(frozen.train()(x), bn(x))
        True
    """

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, bn: nn.modules.batchnorm._NormBase) -> None:
        super().__init__()
        if not bn.track_running_stats or bn.running_mean is None:
            raise TypeError(f"{type(bn).__name__} without running statistics cannot be frozen as an affine map")
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = bn.momentum
        self.affine = bn.affine
        #: the class to put back (unfreeze_batchnorm)
        self.original: type[nn.Module] = type(bn)
        self.register_parameter("weight", bn.weight)
        self.register_parameter("bias", bn.bias)
        for name in _BUFFERS:
            self.register_buffer(name, getattr(bn, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, from {self.original.__name__}"

    def restore(self) -> nn.Module:
        """The original layer, holding this module's parameters and buffers."""
        cls: Any = self.original
        bn = cls(self.num_features, eps=self.eps, momentum=self.momentum, affine=False,
                 track_running_stats=False, device="meta")
        bn.affine = self.affine
        bn.track_running_stats = True
        bn.register_parameter("weight", self.weight)
        bn.register_parameter("bias", self.bias)
        for name in _BUFFERS:
            bn.register_buffer(name, getattr(self, name))
        return bn


def _swap(index: ModelIndex, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = index.modules[parent_name] if parent_name else index.model
    setattr(parent, child, new)


def freeze_batchnorm(model: nn.Module, *selectors: object, exclude: object = ()) -> list[str]:
    """Replace the BatchNorm layers of a selection by :class:`FrozenBatchNorm`.

    Args:
        model: the model (a DDP or compiled wrapper is looked through).
        *selectors: where to look (default: the whole model).
        exclude: selectors to leave alone.

    Returns:
        Names of the replaced modules.

    Raises:
        SelectorError: a selector is malformed or matches nothing.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        >>> lf.freeze_batchnorm(net)
        ['1']
        >>> lf.count_parameters(net).frozen, type(net[1]).__name__
        (8, 'FrozenBatchNorm')
    """
    index = ModelIndex(unwrap(model))
    res = resolve(index, selectors, exclude)
    chosen = [
        n for n in res.modules
        if isinstance(index.modules[n], nn.modules.batchnorm._NormBase)
        and index.modules[n].track_running_stats and n
    ]
    params = [index.canonical[id(p)] for n in chosen for p in index.modules[n].parameters()]
    apply_change(index.model, freeze=params, release=chosen, index=index)
    for name in chosen:
        _swap(index, name, FrozenBatchNorm(index.modules[name]))  # type: ignore[arg-type]
    return chosen


def unfreeze_batchnorm(model: nn.Module, *selectors: object, exclude: object = ()) -> list[str]:
    """Put back the BatchNorm layers :func:`freeze_batchnorm` replaced in a
    selection, trainable again and in the model's training mode.

    Returns:
        Names of the restored modules.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
        >>> _ = lf.freeze_batchnorm(net)
        >>> lf.unfreeze_batchnorm(net), type(net[1]).__name__, net[1].weight.requires_grad
        (['1'], 'BatchNorm1d', True)
    """
    index = ModelIndex(unwrap(model))
    res = resolve(index, selectors, exclude)
    chosen = [n for n in res.modules if isinstance(index.modules[n], FrozenBatchNorm)]
    for name in chosen:
        frozen = index.modules[name]
        bn = frozen.restore()  # type: ignore[operator]
        release(frozen)
        bn.train(index.model.training)
        _swap(index, name, bn)
    index = ModelIndex(index.model)
    params = [index.canonical[id(p)] for n in chosen for p in index.modules[n].parameters()]
    apply_change(index.model, unfreeze=params, index=index)
    return chosen
