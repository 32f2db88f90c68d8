"""A boundary's level: its prefix as a module tree, its store (a feature cache
of that tree), and the small records the party keeps (see :mod:`layerfreeze.skip`)."""

from __future__ import annotations

import hashlib
import inspect
import re
import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..errors import ArgumentError, ArgumentTypeError, CacheError, CacheTypeError
from ..feature_cache.api import cache_config
from ..feature_cache.call import _FeatureCache
from ..feature_cache.stores import _as_bytes, _buffer
from ..feature_cache.validity import _code_digest, fingerprints, own_config, read_names, structure_digest
from ..hooks import ModelHook, inert

if TYPE_CHECKING:
    from .party import SkipParty

__all__ = ["SkipStats", "skip_config"]

_KEYS = ("store", "path", "max_bytes", "verify_every", "padding", "pad_value", "key", "dtype")

# torch.nn classes whose forward depends on the training flag
_MODAL = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase, nn.MultiheadAttention,
          nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.RNNBase)


@dataclass(frozen=True)
class SkipStats:
    """What skipping the frozen prefix does now (:meth:`layerfreeze.Freezer.skip_stats`).

    Attributes:
        boundary: the label of the highest frozen group whose output is stored
            (``"encoder.layer.2"``), or None.
        module: the module whose output is stored: the group's last module, or
            the outermost module around it that is frozen through and through
            (``"bert.encoder"`` once every layer is frozen).
        groups: how many groups of that rule it covers, from the bottom (0: none).
        skipping: whether forwards skip the prefix now.
        reason: why not, when not skipping (None otherwise).
        hits: samples whose boundary output was served from the store (the
            skipped forward of a boundary's proof included).
        misses: samples whose boundary output was computed.
        bytes_held: bytes of stored outputs in memory.
        bytes_on_disk: bytes of stored outputs on disk.
        entries: samples stored at the boundary.

    Example:
        >>> import warnings, torch, torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 4), nn.Linear(4, 1))
        >>> fz = lf.Freezer(net, schedule=lf.Schedule().freeze(["[0]", "[2]"]), cache=True)  # mode="norm"
        >>> _ = fz.set_epoch(0)
        >>> with warnings.catch_warnings(record=True):
        ...     _ = net(torch.randn(4, 3))
        >>> st = fz.skip_stats(); (st.module, st.skipping, st.reason.split(" is in")[0])
        ('2', False, '1 (Dropout)')
    """

    boundary: str | None
    module: str | None
    groups: int
    skipping: bool
    reason: str | None
    hits: int
    misses: int
    bytes_held: int
    bytes_on_disk: int
    entries: int


def skip_config(value: object) -> dict[str, Any] | None:
    """Check the ``cache=`` argument of :class:`~layerfreeze.Freezer`.

    Args:
        value: None/False (off), True or ``"memory"``, ``"disk"`` (with a
            path: pass a dict), or a dict of :func:`layerfreeze.cache` keyword
            arguments (``store``, ``path``, ``max_bytes``, ``padding``,
            ``pad_value``, ``key``, ``dtype``, ``verify_every``).

    Returns:
        The store's settings, or None when off.

    Raises:
        ArgumentTypeError: not one of those types.
        ArgumentError: an unknown key or a value :func:`layerfreeze.cache` refuses.

    Example:
        >>> from layerfreeze.skip import skip_config
        >>> skip_config(True)["store"], skip_config(None)
        ('memory', None)
    """
    if value is None or value is False:
        return None
    if value is True:
        value = {"store": "memory"}
    elif isinstance(value, str):
        if value == "disk":
            raise ArgumentError("cache='disk' needs a directory: pass cache={'store': 'disk', 'path': '...'}")
        value = {"store": value}
    elif not isinstance(value, dict):
        raise ArgumentTypeError(
            f"cache must be None, True, 'memory', or a dict of lf.cache arguments (e.g. "
            f"{{'store': 'disk', 'path': '...'}}), got {type(value).__name__}"
        )
    unknown = [k for k in value if k not in _KEYS]
    if unknown:
        raise ArgumentError(f"cache= has unknown key(s) {unknown}; accepted: {', '.join(_KEYS)}")
    try:
        return cache_config(**value, batch_dim=0)
    except CacheTypeError as e:
        raise ArgumentTypeError(f"cache=: {e}") from None
    except CacheError as e:
        raise ArgumentError(f"cache=: {e}") from None


class _Stop(BaseException):
    """Ends a forward at the boundary (a BaseException: model code catching Exception does not swallow it)."""

    def __init__(self, out: Any) -> None:
        self.out = out


@dataclass
class _Call:
    name: str
    start: int
    parent: int | None
    end: int = -1


@dataclass
class _Candidate:
    label: str
    count: int  # groups of its rule from the bottom, this one included
    b: str  # the boundary module
    params: list[str]  # parameters of those groups
    group_b: str | None = None  # when climbed (see SkipParty._climb): the group's own boundary


#: What the order's trace records for a nested tensor output (no shape to make a placeholder of).
_NESTED = ("nested",)


@dataclass
class _Plan:
    """What one forward does: serve a level's stored output, stop at a module, or neither."""

    batch: int
    length: int | None
    device: torch.device
    serve: Any = None  # the level whose boundary returns ``out``
    out: Any = None
    stop: nn.Module | None = None
    outer: bool = False
    entry: nn.Module | None = None
    served: bool = False
    track: dict[int, str] | None = None  # placeholder ids -> producing module (the proof)
    keep: list[Any] = field(default_factory=list)
    handed: int = 0  # placeholders returned so far
    call: Any = None  # the entry's (args, kwargs), kept to learn the order on it again
    learnt: Any = None  # the party's (names, output structures, trace dims) when the forward began


def _mode_matters(m: nn.Module) -> bool:
    if isinstance(m, _MODAL):
        return True
    if type(m).__module__.startswith("torch.nn."):
        return False
    # the class's own code: decorators around it (transformers' read the flag for gradient
    # checkpointing, which a frozen, skipped module never uses) are not read
    forward = getattr(type(m), "forward", None)
    try:
        own = inspect.unwrap(forward) if callable(forward) else None
    except ValueError:  # a cycle of __wrapped__
        own = forward
    code = getattr(own, "__code__", None)
    return code is not None and "training" in code.co_names


class _PrefixView(nn.Module):
    """The prefix of one boundary as a module tree: what a level's cache checks and names its disk store by."""

    def __init__(self, parts: dict[str, nn.Module], boundary: str, party: SkipParty) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({n.replace(".", "/"): m for n, m in parts.items()})
        # the view's own two containers hold no state: out of the walk's "in training mode"
        # (set directly: .eval() would reach the model's modules)
        self.training = self.parts.training = False
        self.boundary = boundary
        self._party = weakref.ref(party)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        party = self._party()
        assert party is not None
        return party._compute(self.boundary, args, kwargs)


class _LevelCache(_FeatureCache):
    """A level's store: the feature cache of its prefix view."""

    def __init__(self, view: _PrefixView, config: dict[str, Any], level: _Level, party: SkipParty) -> None:
        super().__init__(view, _PrefixView, config)
        self._positional = party._positional
        self.name = f"the frozen prefix up to {level.b}"
        self._level = level
        self._party = weakref.ref(party)

    def _scan(self) -> tuple[tuple[Any, ...], bool]:
        token, _, hooks, _ = self._level.scan()
        return (token, hooks, self._level.outer_token()), self._level.unsafe() is not None

    def _tensors(self) -> list[torch.Tensor]:
        return super()._tensors() + self._level.outer

    def _structure(self) -> str:
        # the Freezer's own instance forwards on the prefix are not the model's code (a run that
        # resumes has them on other modules); the code and plain attributes of the modules around
        # the prefix may feed it too (``x * self.temperature``)
        from .party import _SkipForward

        around = [f"{type(m).__module__}.{type(m).__qualname__}:{_code_digest(getattr(type(m), 'forward', None)).hex()}"
                  f":{own_config(m, read_names(type(m)))}" for m in self._level.around]
        return structure_digest(self.module, self.base, (_SkipForward,)) + "|" + "|".join(around)

    def _digest(self, struct: str) -> str:
        # the disk directory: the tensors around the prefix that feed it (``x * self.scale``) too
        h = hashlib.blake2b(super()._digest(struct).encode(), digest_size=16)
        for i, t in enumerate(self._level.outer + [v for _, v in self._level.outer_attrs()]):
            h.update(f"{i}|{tuple(t.shape)}|{t.dtype}".encode())
            h.update(_buffer(_as_bytes(t.detach().cpu().reshape(1, -1))))
        return h.hexdigest()

    def _why_not(self, inputs: list[Any]) -> str | None:
        reason = self._level.unsafe()
        if reason is not None:
            return reason
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
            return "an input requires grad, so gradients must flow through the prefix"
        return None

    _batch_dim_hint = ("cache= stores samples along dimension 0 only; build the model with batch_first=True "
                       "to let the Freezer skip it")

    def _warn(self, reason: str) -> None:
        # the view's names of the model's modules (parts.encoder/layers/0.attn) as the model's own
        reason = re.sub(r"\bparts\.([\w/]+)", lambda g: g.group(1).replace("/", "."), reason)
        self._level.bypass = reason
        party = self._party()
        if party is not None:
            party._note(f"{self.name}: {reason}; computed, not stored")

    def _fingerprints(self) -> torch.Tensor:
        # levels share the bottom of their prefix: within one forward, each tensor is read once
        party = self._party()
        return fingerprints(self._tensors(), party._memo if party is not None else None)

    def _remember(self, keys: list[bytes]) -> None:
        # the proof's samples come again in the same batch: not a revisit
        party = self._party()
        if party is None or not party._proving:
            super()._remember(keys)


class _Unseen(ModelHook):
    """The pre-hook on a module the learnt forward did not call (it may run before the boundary
    on another batch); not an obstacle to skipping the module it sits on."""

    __slots__ = ()


def _obstacle(n: str, m: nn.Module, party: Any = None) -> str | None:
    """Why module ``m`` (named ``n``) cannot be skipped by ``party`` whatever its mode: hooks,
    an instance forward, another party skipping it."""
    from .party import _WRAPPED, _SkipForward

    shared = (f"{n} is watched by another Freezer with cache= (a module two models share, say); a module is "
              "skipped by one Freezer only")
    hooks = (m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
    found = [h for d in hooks for h in d.values() if h is not inert and not isinstance(h, _Unseen)]
    found += [h for h in m._forward_hooks.values() if h is not inert and not _capturing_hook(h)]  # inert: in a copy
    if found and all(isinstance(h, ModelHook) for h in found):
        return shared
    if found:
        return f"{n} has hooks, which would not run if it were skipped; remove them to let the Freezer skip it"
    own = m.__dict__.get("forward")
    if own is not None and not isinstance(own, _SkipForward):
        return f"{n} has an instance forward; the Freezer skips only modules without one"
    if own is not None and party is not None:
        ref = _WRAPPED.get(m)
        other = ref() if ref is not None else None
        if other is not None and other is not party:
            return shared
    return None


# transformers records hidden states and attentions through forward hooks of this module, left
# on the layers once installed and idle unless a call asks for those outputs (see capturing())
_CAPTURE_MODULE = "transformers.utils.output_capturing"


def _capturing_hook(h: Any) -> bool:
    return getattr(h, "__module__", None) == _CAPTURE_MODULE


def capturing(modules: Iterable[nn.Module]) -> bool:
    """Whether the call in flight asks transformers to record outputs (``output_hidden_states``,
    ``output_attentions``) through hooks on some of ``modules``: they need the real outputs."""
    mod = sys.modules.get(_CAPTURE_MODULE)
    collector = getattr(mod, "_active_collector", None)
    if collector is None:
        return False
    try:
        active = collector.get()
    except Exception:  # another version's collector: take it as asking
        active = True
    if not active:
        return False
    return any(_capturing_hook(h) for m in modules for h in m._forward_hooks.values())


GLOBAL_HOOKS = ("a forward hook is set on every module (nn.modules.module.register_module_forward_hook or "
                "register_module_forward_pre_hook), which would not run on the skipped modules; skipping resumes "
                "when it is removed")


def global_hooked() -> bool:
    """Whether a forward hook or pre-hook is set on every module at once."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def _pre_hooked(m: nn.Module) -> bool:
    """Whether ``m`` has a forward pre-hook of someone else's (one may change the input)."""
    return any(h is not inert and not isinstance(h, ModelHook) for h in m._forward_pre_hooks.values())


def _around(party: SkipParty, b: str, modules: dict[str, nn.Module]) -> list[nn.Module]:
    """The modules whose calls contain boundary ``b``'s (the forward's own module, containers), innermost first."""
    calls = party._calls
    k = next(i for i, c in enumerate(calls) if c.name == b)
    out: list[nn.Module] = []
    parent = calls[k].parent
    while parent is not None:
        out.append(modules[calls[parent].name])
        parent = calls[parent].parent
    return out


class _Level:
    """One boundary: its prefix, the modules that return placeholders, its store."""

    def __init__(self, party: SkipParty, cand: _Candidate, before: list[str], prefix: list[str]) -> None:
        model = party.model
        modules = dict(model.named_modules())
        self.cand = cand
        self.b = cand.b
        self.b_module = modules[cand.b]
        self.before = before
        self.before_ids = {id(modules[n]) for n in before}
        self.prefix = set(prefix)
        parts = {n: modules[n] for n in [*before, cand.b]}
        self.params = [p for m in parts.values() for p in m.parameters()]
        self.modal = [(n, m) for top, mod in parts.items() for n, m in mod.named_modules(prefix=top) if _mode_matters(m)]
        self.tree = [(n, m) for top, mod in parts.items() for n, m in mod.named_modules(prefix=top)]
        self.tree_ids = {id(m) for _, m in self.tree}
        # the direct tensors of the modules whose code runs around the prefix (the
        # forward's own module, containers): frozen ones are watched with the prefix
        self.around = _around(party, cand.b, modules)
        self.modal_around = [m for m in self.around if _mode_matters(m)]
        # whether their mode changes the boundary's output (decided by the proof; until then, yes)
        self.mode_matters = True
        # where each part and each module around them sits in the model (one replaced, or a
        # container swapped for another that holds the same parts, leaves this level stale)
        self.root = model
        names = {id(m): n for n, m in modules.items()}
        self.places = [(n, n.split("."), m) for n, m in [*parts.items(), *((names[id(a)], a) for a in self.around)] if n]
        self.outer: list[torch.Tensor] = []
        self.trainable_around: frozenset[int] | None = None
        self.around_changed()
        self.view = _PrefixView(parts, cand.b, party)
        self.cache = _LevelCache(self.view, party.config, self, party)
        self._party = weakref.ref(party)
        self.structure: tuple[Any, ...] = ()
        self.hooks: tuple[Any, ...] = ()
        self.proven = False
        self.bypass: str | None = None  # why its store holds nothing (rows that are not independent, say)

    def settle(self) -> None:
        """Take the tree's structure and hooks as they are now (its modules wrapped): what
        :meth:`replaced` and :meth:`unsafe` compare with."""
        party = self._party()
        if party is not None and party._scans is not None:
            party._scans.pop(id(self), None)
        _, self.structure, self.hooks, _ = self.scan()

    def scan(self) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...], bool]:
        """One walk over the prefix's tree per forward (kept for the forward's other checks):
        its cache's token, its structure, its hooks, and whether anything in it requires
        grad or is in training mode."""
        party = self._party()
        memo = party._scans if party is not None else None
        got = memo.get(id(self)) if memo is not None else None
        if got is None:
            token, structure, hooks, live = self.cache._walk()
            got = (token, structure, hooks, live)
            if memo is not None:
                memo[id(self)] = got
        return got

    def unsafe(self) -> str | None:
        if global_hooked():
            return GLOBAL_HOOKS
        _, _, hooks, live = self.scan()
        if live:  # something in the tree requires grad or is in training mode: which, and does it matter?
            for p in self.params:
                if p.requires_grad:
                    return "a parameter of the prefix is trainable"
            for n, m in self.modal:
                if m.training:
                    return f"{n} is in training mode"
        if hooks == self.hooks:  # no hook added since: the walk below would find nothing
            return self._around_hooked()
        for n, m in self.tree:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or \
                    "forward" in m.__dict__:
                why = _obstacle(n, m, self._party())
                if why is not None:
                    return why
        self.hooks = hooks  # none of them stands in the way (transformers' idle ones): not walked again
        return self._around_hooked()

    def _around_hooked(self) -> str | None:
        for m in self.around:
            if m._forward_pre_hooks and _pre_hooked(m):
                return "a module around the prefix has a forward pre-hook"
        return None

    def around_changed(self) -> bool:
        """Whether the trainable parameters of the modules around the prefix changed since the
        last call (their frozen tensors are then watched anew); the proof holds for the old set only."""
        now = frozenset(id(p) for m in self.around for p in m._parameters.values() if p is not None and p.requires_grad)
        if now == self.trainable_around:
            return False
        first = self.trainable_around is None
        self.trainable_around = now
        self.outer = [t for m in self.around for t in [*m._parameters.values(), *m._buffers.values()]
                      if t is not None and not t.requires_grad]
        return not first

    def replaced(self) -> str | None:
        """Which part of the prefix is no longer at its place in the model (or has
        another submodule or parameter inside), or None."""
        for n, path, m in self.places:
            cur: nn.Module | None = self.root
            for k in path:
                cur = cur._modules.get(k) if cur is not None else None
            if cur is not m:
                return f"{n} was replaced in the model"
        if self.scan()[1] != self.structure:
            return f"a submodule, parameter or buffer of {', '.join(self.view.parts)} was replaced".replace("/", ".")
        return None

    def outer_attrs(self) -> list[tuple[str, torch.Tensor]]:
        """The public tensor attributes of the modules around the prefix (``self.shift``), by name."""
        return [(k, v) for m in self.around for k, v in m.__dict__.items()
                if isinstance(v, torch.Tensor) and not k.startswith("_")]

    def outer_token(self) -> tuple[Any, ...]:
        """What the modules around the prefix hold that may feed it, cheap to compare: their
        frozen parameters and buffers, tensor attributes, and mode where their forward reads it."""
        out: list[Any] = [x for t in self.outer for x in (id(t), t.data_ptr(), t._version)]
        for k, v in self.outer_attrs():
            out += (k, id(v), v.data_ptr(), v._version)
        if self.mode_matters:
            out += [m.training for m in self.modal_around]
        return tuple(out)

    def entries(self) -> set[bytes]:
        c = self.cache
        keys = set(c.memory.index) if c.memory is not None else set()
        if c.disk is not None:
            keys |= set(c.disk.index)
        return keys
