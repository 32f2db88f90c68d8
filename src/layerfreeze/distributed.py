"""Freeze changes under ``torch.distributed``: DDP and FSDP2.

Two things go wrong when the trainable set changes under data parallelism:

* ``DistributedDataParallel`` registers, when it is wrapped, the parameters that
  require grad at that moment. A parameter unfrozen later is never
  all-reduced, so the ranks drift apart without any error; a parameter frozen
  later leaves a bucket waiting forever ("Expected to have finished reduction")
  unless the slow ``find_unused_parameters=True`` is set.
* Ranks that disagree about what is frozen (a schedule driven by a
  rank-local counter, a data-dependent decision) train different models.

:class:`DistributedSync` is a listener on the freeze road (see
:func:`layerfreeze.subscribe`). At every transition it first checks, with one
tiny all-reduce, that every rank is heading for the same frozen set (and
raises :class:`RankMismatchError` on every rank, before anything changes, if
not); then, for DDP, it rebuilds the wrapper's reducer in place so that its
buckets hold exactly the parameters that now require grad.

Rebuild, not re-wrap: the reducer is rebuilt inside the same DDP object, the
way DDP itself rebuilds it when unpickled, so the object the user trains with
(and anything holding it: a trainer, a ``torch.compile`` wrapper, a
checkpointing helper) stays valid. Re-wrapping would create a new object, run
DDP's start-up broadcast of every parameter and buffer again and leave stale
references behind. Comm hooks registered with ``register_comm_hook`` are
registered again on the new reducer; built-in C++ hooks registered through the
private ``_register_builtin_comm_hook`` are not recorded by DDP and are lost.

FSDP2 (``fully_shard``) keeps ``requires_grad`` on its sharded parameters and
follows changes on its own; the listener adds the cross-rank check.

Transitions must happen between steps (not between a forward and its
backward), on every rank, with the same arguments: like any collective.
:class:`layerfreeze.Freezer` attaches a :class:`DistributedSync` by itself when
it is given a DDP or FSDP2 model; use :func:`attach` when freezing through the
plain functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .core import Change, subscribe
from .errors import ArgumentError, RankMismatchError
from .selectors import ModelIndex, unwrap

__all__ = [
    "DistributedSync",
    "RankMismatchError",
    "attach",
    "check_frozen_set",
    "find_ddp",
    "frozen_set_digest",
    "is_fsdp2",
    "rebuild_reducer",
]

_MASK = (1 << 62) - 1  # keeps -digest representable in int64


def frozen_set_digest(names: Iterable[str]) -> int:
    """A 62-bit digest of a set of parameter names, independent of their order.

    Example:
        >>> frozen_set_digest(["a.weight", "b.bias"]) == frozen_set_digest(["b.bias", "a.weight"])
        True
    """
    h = hashlib.blake2b("\n".join(sorted(set(names))).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & _MASK


def _active(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _collective_device(group: Any, hint: torch.device) -> torch.device:
    if hint.type != "cpu":
        return hint
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    # NCCL-only groups cannot reduce CPU tensors
    return torch.device("cuda", torch.cuda.current_device())


def check_frozen_set(
    frozen: Iterable[str],
    *,
    group: Any = None,
    device: torch.device | None = None,
    context: str = "",
) -> None:
    """Verify that every rank of ``group`` has the same frozen set.

    One all-reduce of two int64 values (the maximum of the digest and of its
    negation) in the normal case; only on a mismatch are the sets gathered to
    say which parameters differ. A collective: every rank must call it.

    Args:
        frozen: canonical names of the frozen parameters on this rank.
        group: the process group (default: the world).
        device: where to put the reduced tensor (default: CPU for gloo, the
            current CUDA device for NCCL).
        context: what was being done, for the error message.

    Raises:
        RankMismatchError: the ranks disagree (raised on every rank).

    Example:
        >>> check_frozen_set(["fc1.weight"])  # no-op without a process group
    """
    if not _active(group):
        return
    names = sorted(set(frozen))
    digest = frozen_set_digest(names)
    dev = _collective_device(group, device or torch.device("cpu"))
    t = torch.tensor([digest, -digest], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) == -int(t[1]):
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, names, group=group)
    sets = [set(g) for g in gathered]
    everywhere = set.intersection(*sets)
    differing = sorted(set.union(*sets) - everywhere)
    lines = []
    for name in differing[:6]:
        on = [r for r, s in enumerate(sets) if name in s]
        off = [r for r, s in enumerate(sets) if name not in s]
        lines.append(f"  {name}: frozen on ranks {on}, trainable on ranks {off}")
    more = f"\n  ... and {len(differing) - 6} more" if len(differing) > 6 else ""
    what = f" {context}" if context else ""
    raise RankMismatchError(
        f"ranks disagree about the frozen set{what}:\n" + "\n".join(lines) + more + "\n"
        "Every rank must make the same freeze changes at the same step (call set_epoch/"
        "set_step with the same values everywhere, and make schedule decisions from "
        "values that are identical on every rank). Nothing was changed.",
        {r: len(s) for r, s in enumerate(sets)},
    )


def rebuild_reducer(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Make ``ddp``'s reducer hold exactly the parameters that now require grad.

    The DDP object is kept; only its reducer (buckets and gradient hooks) is
    rebuilt, as DDP does when it is unpickled. Python comm hooks are
    registered again. No communication happens: parameters are assumed to be
    identical on every rank already, which DDP guarantees for parameters that
    were trained or frozen under it.

    Raises:
        ArgumentError: no parameter would require grad (DDP cannot reduce an
            empty set; unwrap or keep one parameter trainable).
    """
    params, sparse = ddp._build_params_for_reducer()
    if not params:
        raise ArgumentError(
            "this change would leave the DistributedDataParallel model with no trainable "
            "parameter, which DDP cannot handle; keep at least one parameter trainable, or "
            "run the fully frozen phase on the inner model (ddp.module) under torch.no_grad()"
        )
    mapping = ddp._build_debug_param_to_name_mapping(params)
    ddp._ddp_init_helper(params, sparse, mapping, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        if ddp.logger is not None:
            ddp.logger._set_static_graph()
    for hook, state in getattr(ddp, "_comm_hooks", []):
        dist._register_comm_hook(ddp.reducer, state, hook)
    precision = getattr(ddp, "mixed_precision", None)
    if precision is not None:
        ddp.reducer._set_mixed_precision_param_dtype(precision.param_dtype)  # type: ignore[attr-defined]


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules was sharded with ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in unwrap(model).modules())


class DistributedSync:
    """Listener that keeps DDP / FSDP2 consistent across freeze changes.

    Args:
        model: the DDP wrapper, or an FSDP2-sharded model.
        root: the module whose names selectors use, if it is not the inner
            model (e.g. a LightningModule inside Lightning's DDP wrapper).
        group: the process group to check across (default: DDP's group, else
            the world).

    Example:
        >>> import torch.nn as nn
        >>> sync = DistributedSync(nn.Linear(2, 2))  # nothing to do without a process group
        >>> sync.ddp is None
        True
    """

    def __init__(self, model: nn.Module, *, root: nn.Module | None = None, group: Any = None) -> None:
        self.ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        self.root = root if root is not None else unwrap(model)
        if group is None and self.ddp is not None:
            group = self.ddp.process_group
        self.group = group
        #: reducer rebuilds done, for tests and logs
        self.rebuilds = 0

    def _device(self) -> torch.device:
        p = next(self.root.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def validate(self, change: Change) -> None:
        frozen = {n for n, p in change.index.by_canonical.items() if not p.requires_grad}
        target = (frozen - set(change.unfreeze)) | set(change.freeze)
        if self.ddp is not None:
            ignored = self.ddp.parameters_to_ignore
            prefix = self._prefix()
            left = [
                n for n in change.index.by_canonical
                if n not in target and f"{prefix}{n}" not in ignored
            ]
            if not left:
                raise ArgumentError(
                    "this change would leave the DistributedDataParallel model with no trainable "
                    f"parameter ({len(change.freeze)} tensor(s) to freeze), which DDP cannot handle; "
                    "keep at least one parameter trainable"
                )
        when = change.options.get("epoch"), change.options.get("step")
        context = ""
        if when[0] is not None:
            context = f"at epoch {when[0]}"
        elif when[1] is not None:
            context = f"at step {when[1]}"
        check_frozen_set(target, group=self.group, device=self._device(), context=context)

    def _prefix(self) -> str:
        if self.ddp is None:
            return ""
        for name, module in self.ddp.module.named_modules():
            if module is self.root:
                return f"{name}." if name else ""
        return ""

    def apply(self, change: Change) -> None:
        if self.ddp is not None:
            rebuild_reducer(self.ddp)
            self.rebuilds += 1

    def close(self) -> None:
        """Nothing to release: the road's subscription is the only link."""


def attach(model: nn.Module, *, root: nn.Module | None = None, group: Any = None) -> Any:
    """Subscribe a :class:`DistributedSync` for ``model`` if it is DDP or FSDP2.

    Args:
        model: the object being trained (a DDP wrapper, an FSDP2 model, or
            anything else, for which nothing is done).
        root: the module freeze changes are made on, when it is not the model
            DDP wraps directly.
        group: process group to check across.

    Returns:
        The subscription handle (``.remove()`` detaches; ``.listener`` is the
        :class:`DistributedSync`), or None when ``model`` is not distributed.

    Example:
        >>> import torch.nn as nn
        >>> attach(nn.Linear(2, 2)) is None
        True
    """
    found = find_ddp(model)
    if found is None and not is_fsdp2(model):
        return None
    sync = DistributedSync(found if found is not None else model, root=root, group=group)
    handle = subscribe(sync.root, sync)
    handle.listener = sync  # type: ignore[attr-defined]
    return handle


def find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel object ``model`` is or wraps (``torch.compile``), or None.

    Example:
        >>> import torch.nn as nn
        >>> find_ddp(nn.Linear(2, 2)) is None
        True
    """
    # torch.compile(ddp) puts the DDP object under _orig_mod
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner


def frozen_names(model: nn.Module) -> list[str]:
    """Canonical names of the frozen parameters of ``model`` (wrappers looked through)."""
    return [n for n, p in ModelIndex(model).by_canonical.items() if not p.requires_grad]


_find_ddp = find_ddp
