"""The keyed call: validity checks, per-sample keys, lookups, partial
computation of missing samples and assembly of the batch's output."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..guard import fingerprint
from .layout import _CONST_TYPES, _flatten, _Layout, _layout_of, _rebuild, _unflatten
from .stores import _as_bytes, _buffer, _DiskStore, _MemoryStore

log = logging.getLogger("layerfreeze")

_FORMAT = 1


@dataclass(frozen=True)
class CacheStats:
    """Counters of one cached module.

    Attributes:
        hits: samples served from the cache.
        misses: samples computed by the module (and stored when possible).
        bytes_held: bytes of features held in memory (allocated capacity).
        bytes_on_disk: bytes of features in this weight version's disk files.
        entries: samples stored (memory and disk).
        bypassed: calls that ran the module uncached (not frozen, not eval, ...).
    """

    hits: int
    misses: int
    bytes_held: int
    bytes_on_disk: int
    entries: int
    bypassed: int


class _FeatureCache:
    def __init__(self, module: nn.Module, forward: Callable[..., Any], store: str,
                 max_bytes: int | None, path: str | None, verify_every: int) -> None:
        self._module = weakref.ref(module)
        self.name = type(module).__qualname__
        self.forward = forward
        self.store = store
        self.verify_every = verify_every
        self.hits = self.misses = self.bypassed = self.calls = 0
        self._warned: set[str] = set()
        self._token: tuple[Any, ...] | None = None
        self._prints: torch.Tensor | None = None
        self._pin = False
        self.memory: _MemoryStore | None = None
        self.disk: _DiskStore | None = None
        self._tmp: str | None = None
        if store == "memory":
            self.memory = _MemoryStore(max_bytes, pin=False)
            if max_bytes is not None:
                root = path
                if root is None:
                    root = self._tmp = tempfile.mkdtemp(prefix="layerfreeze-cache-")
                    weakref.finalize(self, shutil.rmtree, root, True)
                self.disk = _DiskStore(root, None)
        else:
            assert path is not None
            self.disk = _DiskStore(path, max_bytes)
        # precompute() sets this to stop the model's forward once the feature is stored
        self.stop_after: bool = False

    @property
    def module(self) -> nn.Module:
        m = self._module()
        assert m is not None
        return m

    # ---------------------------------------------------------------- validity

    def _scan(self) -> tuple[list[torch.Tensor], bool]:
        """Parameters and buffers of the module, and whether any submodule is in
        training mode or any parameter requires grad: one pass, run every call."""
        tensors: list[torch.Tensor] = []
        unsafe = False
        stack = [self.module]
        seen: set[int] = set()
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            unsafe = unsafe or m.training
            for p in m._parameters.values():
                if p is not None:
                    tensors.append(p)
                    unsafe = unsafe or p.requires_grad
            tensors.extend(b for b in m._buffers.values() if b is not None)
            stack.extend(c for c in m._modules.values() if c is not None)
        return tensors, unsafe

    def _tensors(self) -> list[torch.Tensor]:
        return self._scan()[0]

    def _why_not(self, inputs: list[Any]) -> str | None:
        for pname, p in self.module.named_parameters():
            if p.requires_grad:
                return f"parameter {pname!r} requires grad, so the module is not frozen"
        for name, m in self.module.named_modules():
            if m.training:
                where = f"submodule {name!r}" if name else "the module"
                return (f"{where} is in training mode (dropout and batch statistics make features "
                        "random); freeze it with lf.freeze(..., mode='eval')")
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                return "an input requires grad, so gradients must flow through the module"
        return None

    def _state_token(self, tensors: list[torch.Tensor]) -> tuple[Any, ...]:
        return tuple((id(t), t.data_ptr(), t._version, t.requires_grad) for t in tensors)

    def _fingerprints(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        # in slices: summing a whole embedding matrix as int64 would briefly
        # take twice its size; integer sums of slices add up to the same value
        prints = [torch.stack([fingerprint(c) for c in t.detach().reshape(-1).split(1 << 20)]).sum().cpu()
                  if t.numel() else torch.zeros((), dtype=torch.int64) for t in tensors]
        return torch.stack(prints) if prints else torch.zeros(0)

    def _digest(self, tensors: list[torch.Tensor]) -> str:
        """Content hash of the module's weights, names, and class: the disk directory."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"layerfreeze-cache {_FORMAT} {self.name}".encode())
        for name, t in list(self.module.named_parameters()) + list(self.module.named_buffers()):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            data = _as_bytes(t.detach().cpu().reshape(1, -1))
            h.update(_buffer(data))
        return h.hexdigest()

    def invalidate(self, tensors: list[torch.Tensor] | None = None) -> None:
        """Drop everything held for the current weights and re-key to the current ones."""
        tensors = self._tensors() if tensors is None else tensors
        if self.memory is not None:
            self.memory.clear()
        if self.disk is not None:
            if self._tmp is not None and self.disk.dir is not None:
                shutil.rmtree(self.disk.dir, ignore_errors=True)
            self.disk.open(self._digest(tensors))
        self._token = self._state_token(tensors)
        self._prints = None

    def verify(self) -> bool:
        """Check the weights' content against the fingerprint taken at fill time.

        Returns:
            True if the cache was still valid; False if it was dropped.
        """
        tensors = self._tensors()
        if self._token != self._state_token(tensors):
            self.invalidate(tensors)
            return False
        now = self._fingerprints(tensors)
        if self._prints is not None and not torch.equal(now, self._prints):
            log.info("cached module's weights changed in place (e.g. through .data): cache dropped")
            self.invalidate(tensors)
            self._prints = now
            return False
        self._prints = now
        return True

    def _warn(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"layerfreeze cache of {self.name}: {reason}; computing normally, not cached",
                          stacklevel=6)

    # ---------------------------------------------------------------- keys

    def _keys(self, leaves: list[Any], spec: Any, kwnames: tuple[str, ...]) -> tuple[list[bytes], int] | str:
        batched = [x for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0]
        if not batched:
            return "no tensor argument has a batch dimension"
        b = batched[0].shape[0]
        prefix = hashlib.blake2b(digest_size=16)
        prefix.update(repr((spec, kwnames)).encode())
        for dev in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dev):
                prefix.update(f"autocast {dev} {torch.get_autocast_dtype(dev)}".encode())
        rows = []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                if x.dim() == 0:
                    prefix.update(f"scalar {x.dtype} {x.item()!r}".encode())
                    continue
                if x.shape[0] != b:
                    return f"tensor arguments disagree on the batch size ({b} and {x.shape[0]})"
                prefix.update(f"T{x.dtype}{tuple(x.shape[1:])}".encode())
                rows.append(_as_bytes(x.detach().cpu()))
            elif isinstance(x, _CONST_TYPES):
                prefix.update(f"C{x!r}".encode())
            else:
                return f"an argument of type {type(x).__name__} cannot be part of a cache key"
        keys = []
        views = [(_buffer(r), r.shape[1]) for r in rows]
        for i in range(b):
            h = prefix.copy()
            for mv, width in views:
                h.update(mv[i * width:(i + 1) * width])
            keys.append(h.digest())
        return keys, b

    # ---------------------------------------------------------------- the call

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kwnames = tuple(kwargs)
        leaves: list[Any] = []
        spec = _flatten((args, tuple(kwargs.values())), leaves)
        tensors, unsafe = self._scan()
        reason = self._why_not(leaves) if unsafe or any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in leaves) else None
        if reason is None:
            keyed = self._keys(leaves, spec, kwnames)
            reason = keyed if isinstance(keyed, str) else None
        if reason is not None:
            self._warn(reason)
            self.bypassed += 1
            return self.forward(*args, **kwargs)
        assert not isinstance(keyed, str)
        keys, batch = keyed

        if self._token != self._state_token(tensors):
            self.invalidate(tensors)
        self.calls += 1
        if self.verify_every and self.calls % self.verify_every == 0:
            self.verify()

        found = [self._lookup(k) for k in keys]
        miss = [i for i, f in enumerate(found) if f is None]
        lids = {f[1] for f in found if f is not None}
        device = next(x.device for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0)
        if len(lids) > 1:  # one sample's output shape differs from another's: compute all afresh
            miss = list(range(batch))

        computed: Any = None
        layout: _Layout | None = None
        fresh: list[torch.Tensor] = []
        if miss:
            if len(miss) == batch:
                sub_args, sub_kwargs = args, kwargs
            else:
                sub_args, sub_kwargs = self._take(leaves, spec, kwnames, miss, batch)
            computed = self.forward(*sub_args, **sub_kwargs)
            got = _layout_of(computed, len(miss))
            if isinstance(got, str):
                self._warn(got)
                self.bypassed += 1
                return computed if len(miss) == batch else self.forward(*args, **kwargs)
            layout, fresh = got
            self.misses += len(miss)
            self._store(layout, [keys[i] for i in miss], fresh)
            if self.stop_after:
                raise _StopForward
            if len(miss) == batch:
                return computed
        self.hits += batch - len(miss)
        if self.stop_after:
            raise _StopForward

        hit = [i for i in range(batch) if found[i] is not None]
        where, lid = found[hit[0]][0], found[hit[0]][1]  # type: ignore[index]
        store = self.memory if where == "m" else self.disk
        assert store is not None
        hit_layout = store.layouts[lid]
        if layout is not None and (layout.shapes, layout.dtypes, layout.spec) != (
                hit_layout.shapes, hit_layout.dtypes, hit_layout.spec):
            self.misses += batch - len(miss)
            self.hits -= batch - len(miss)
            return self.forward(*args, **kwargs)
        parts = self._gather(found, hit, device)
        if not miss:
            outs = parts
        else:
            outs = []
            hit_idx = torch.tensor(hit, device=device)
            miss_idx = torch.tensor(miss, device=device)
            for p, f in zip(parts, fresh, strict=True):
                full = torch.empty((batch, *p.shape[1:]), dtype=p.dtype, device=device)
                full.index_copy_(0, hit_idx, p)
                full.index_copy_(0, miss_idx, f.detach())
                outs.append(full)
        return _rebuild(hit_layout, outs)

    def _lookup(self, key: bytes) -> tuple[str, str, int] | None:
        if self.memory is not None:
            got = self.memory.index.get(key)
            if got is not None:
                return ("m", got[0], got[1])
        if self.disk is not None:
            got = self.disk.index.get(key)
            if got is not None:
                return ("d", got[0], got[1])
        return None

    def _gather(self, found: list[Any], hit: list[int], device: torch.device) -> list[torch.Tensor]:
        in_mem = [i for i in hit if found[i][0] == "m"]
        on_disk = [i for i in hit if found[i][0] == "d"]
        lid = found[hit[0]][1]
        if not on_disk:
            assert self.memory is not None
            return self.memory.get(lid, [found[i][2] for i in hit], device)
        assert self.disk is not None
        if not in_mem:
            return [t.to(device, non_blocking=True) for t in self.disk.get(lid, [found[i][2] for i in hit])]
        assert self.memory is not None
        a = self.memory.get(lid, [found[i][2] for i in in_mem], torch.device("cpu"))
        b = self.disk.get(lid, [found[i][2] for i in on_disk])
        pos = {i: k for k, i in enumerate(in_mem + on_disk)}
        order = torch.tensor([pos[i] for i in hit])
        return [torch.cat([x, y])[order].to(device, non_blocking=True) for x, y in zip(a, b, strict=True)]

    def _store(self, layout: _Layout, keys: list[bytes], fresh: list[torch.Tensor]) -> None:
        if self._prints is None:
            self._prints = self._fingerprints(self._tensors())
        rows = [f.detach() for f in fresh]
        if self.memory is not None and fresh[0].is_cuda and not self.memory.pin:
            self.memory.pin = True
        lid = layout.ident()
        done = 0
        if self.memory is not None:
            done = self.memory.put(lid, layout, keys, rows)  # copy_ moves device rows straight to host
        if done < len(keys) and self.disk is not None:
            rest = [r[done:] for r in rows]
            done += self.disk.put(lid, layout, keys[done:], [r.cpu() for r in rest])
        if done < len(keys):
            self._warn("the cache is full (max_bytes reached); further samples are computed, not stored")

    def _take(self, leaves: list[Any], spec: Any, kwnames: tuple[str, ...], rows: list[int],
              batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        idx: dict[torch.device, torch.Tensor] = {}
        picked = []
        for x in leaves:
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
                if x.device not in idx:
                    idx[x.device] = torch.tensor(rows, device=x.device)
                x = x.index_select(0, idx[x.device])
            picked.append(x)
        args, kwvalues = _unflatten(spec, picked)
        return tuple(args), dict(zip(kwnames, kwvalues, strict=True))

    def stats(self) -> CacheStats:
        mem = self.memory
        disk = self.disk
        entries = (len(mem.index) if mem else 0) + (len(disk.index) if disk else 0)
        return CacheStats(self.hits, self.misses, mem.nbytes if mem else 0, disk.nbytes if disk else 0,
                          entries, self.bypassed)


class _StopForward(Exception):
    """Raised by a cache during :func:`precompute` once its features are stored."""

