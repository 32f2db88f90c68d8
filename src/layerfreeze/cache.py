"""A per-sample feature cache that makes a frozen submodule nearly free.

``lf.cache(model.encoder)`` makes the encoder remember its output for every
sample it has seen. A sample is recognised by content: the bytes of its row
(dimension 0 is the batch) in every tensor argument, plus the shapes, dtypes
and non-tensor arguments of the call, hashed with BLAKE2b to 128 bits. Shuffled
batches, other batch sizes and a short last batch therefore all hit.

What "identical" means: a hit returns, bit for bit, the values the module
produced for that sample when it was first computed. A fresh forward of the
same batch gives the same bits when the module's kernels do not depend on the
batch composition; some CPU/GPU kernels pick a different reduction order for a
different batch size (on CPU, MiniLM run on 1 sample instead of 32 differs by
about 1e-6), so re-batched samples agree to that rounding, not bitwise.

The cache is only used while it cannot be wrong: the module is fully frozen
(no parameter requires grad), every submodule is in eval mode (use
``lf.freeze(..., mode="eval")``) and no input requires grad. Otherwise the
module runs normally and a warning says why, once per reason.

Invalidation, checked on every call: parameter and buffer objects, their data
pointers, their in-place version counters and ``requires_grad`` flags. This
covers optimizer steps, ``load_state_dict``, in-place edits under
``torch.no_grad()``, ``param.data = ...``, and Freezer transitions. Edits made
through ``param.data.<op>_()`` bypass version counters; they are caught by an
exact content fingerprint (:func:`layerfreeze.guard.fingerprint`) taken when
the cache is first filled, at every :func:`precompute`, every ``verify_every``
calls and on ``verify()``.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .guard import fingerprint

__all__ = ["CacheStats", "cache", "precompute"]

log = logging.getLogger("layerfreeze")

_STORES = ("memory", "disk")
_CONST_TYPES = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)
_FORMAT = 1
_CHUNK_BYTES = 256 << 20  # largest chunk of the memory store
_MERGE_BYTES = 4 << 30  # past this, a memory store's chunks are no longer merged


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


# --------------------------------------------------------------------------- structure


def _flatten(obj: Any, leaves: list[Any]) -> Any:
    """Collect the leaves of a nested output/argument; return its structure spec."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return ("T",)
    if isinstance(obj, dict):
        keys = list(obj.keys())
        return ("map", type(obj), tuple(keys), tuple(_flatten(obj[k], leaves) for k in keys))
    if isinstance(obj, (tuple, list)):
        return ("seq", type(obj), tuple(_flatten(v, leaves) for v in obj))
    leaves.append(obj)
    return ("C",)


def _unflatten(spec: Any, leaves: Iterable[Any]) -> Any:
    return _build(spec, iter(leaves))


def _build(s: Any, it: Iterator[Any]) -> Any:
    # A plain recursive function, not a closure: a nested function that calls
    # itself is a reference cycle holding the leaves (the batch's output
    # tensors) until the cyclic garbage collector happens to run.
    if s[0] in ("T", "C"):
        return next(it)
    if s[0] == "map":
        values = [_build(c, it) for c in s[3]]
        cls = s[1]
        if cls is dict:
            return dict(zip(s[2], values, strict=True))
        try:
            return cls(**dict(zip(s[2], values, strict=True)))  # ModelOutput and other dataclass-like maps
        except TypeError:
            return cls(zip(s[2], values, strict=True))
    values = [_build(c, it) for c in s[2]]
    cls = s[1]
    if cls in (tuple, list):
        return cls(values)
    if hasattr(cls, "_fields"):  # namedtuple
        return cls(*values)
    return cls(values)


def _spec_json(spec: Any) -> Any:
    """A JSON form of a spec, for the disk store (classes by import path)."""
    if spec[0] in ("T", "C"):
        return spec[0]
    cls = spec[1]
    path = f"{cls.__module__}:{cls.__qualname__}"
    if spec[0] == "map":
        return {"map": path, "keys": list(spec[2]), "items": [_spec_json(c) for c in spec[3]]}
    return {"seq": path, "items": [_spec_json(c) for c in spec[2]]}


def _spec_from_json(data: Any) -> Any:
    if data in ("T", "C"):
        return (data,)
    kind = "map" if "map" in data else "seq"
    modname, _, qualname = data[kind].partition(":")
    obj: Any = importlib.import_module(modname)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, (dict, tuple, list))):
        raise ValueError(f"cache layout names {data[kind]}, which is not a container type")
    items = tuple(_spec_from_json(c) for c in data["items"])
    if kind == "map":
        return ("map", obj, tuple(data["keys"]), items)
    return ("seq", obj, items)


@dataclass
class _Layout:
    """Structure of one kind of output: spec, constant leaves, per-leaf row shape and dtype."""

    spec: Any
    consts: tuple[Any, ...]  # non-tensor leaves (None where a tensor goes)
    is_tensor: tuple[bool, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def row_bytes(self) -> list[int]:
        return [math.prod(s) * torch.empty((), dtype=d).element_size()
                for s, d in zip(self.shapes, self.dtypes, strict=True)]

    def ident(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": _spec_json(self.spec),
            "consts": [c if c is None or isinstance(c, (bool, int, float, str)) else repr(c) for c in self.consts],
            "is_tensor": list(self.is_tensor),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Layout:
        return cls(
            _spec_from_json(data["spec"]),
            tuple(data["consts"]),
            tuple(data["is_tensor"]),
            tuple(tuple(s) for s in data["shapes"]),
            tuple(getattr(torch, d) for d in data["dtypes"]),
        )


def _layout_of(out: Any, batch: int) -> tuple[_Layout, list[torch.Tensor]] | str:
    leaves: list[Any] = []
    spec = _flatten(out, leaves)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors:
        return "the module returned no tensor"
    for x in tensors:
        if x.dim() == 0 or x.shape[0] != batch:
            return f"an output of shape {tuple(x.shape)} has no batch dimension of size {batch}"
    consts: list[Any] = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            consts.append(None)
        elif isinstance(x, _CONST_TYPES):
            consts.append(x)
        else:
            return f"the output holds a {type(x).__name__}, which the cache cannot store"
    layout = _Layout(spec, tuple(consts), tuple(isinstance(x, torch.Tensor) for x in leaves), tuple(tuple(x.shape[1:]) for x in tensors),
                     tuple(x.dtype for x in tensors))
    return layout, tensors


def _rebuild(layout: _Layout, tensors: list[torch.Tensor]) -> Any:
    it = iter(tensors)
    return _unflatten(layout.spec, [next(it) if t else c for c, t in zip(layout.consts, layout.is_tensor, strict=True)])


# --------------------------------------------------------------------------- stores


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` host tensor -> contiguous ``[n, row_bytes]`` uint8 tensor."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(t.shape[0], -1).view(torch.uint8).reshape(t.shape[0], -1)


def _buffer(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (hashlib and file
    writes read it directly; the caller keeps ``t`` alive meanwhile)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


class _MemoryStore:
    """Rows of each layout in chunks, each one tensor per output leaf.

    Capacity doubles as samples arrive (chunks of 64, 64, 128, 256, ... rows,
    at most ``_CHUNK_BYTES`` each) by *adding* a chunk: filling the cache
    copies no stored row, and the capacity beyond what is stored is at most
    one chunk. The first hit batch that spans chunks merges them (see
    :meth:`get`), so warm epochs gather every batch with one ``index_select``.
    """

    def __init__(self, budget: int | None, pin: bool) -> None:
        self.budget = budget
        self.pin = pin
        self.clear()

    def clear(self) -> None:
        self.index: dict[bytes, tuple[str, int]] = {}
        self.layouts: dict[str, _Layout] = {}
        self.chunks: dict[str, list[list[torch.Tensor]]] = {}
        self.starts: dict[str, list[int]] = {}  # first slot of each chunk
        self.cap: dict[str, int] = {}
        self.count: dict[str, int] = {}
        self.nbytes = 0

    def _grow(self, lid: str, layout: _Layout, need: int) -> int:
        """Add chunks for up to ``need`` more rows; return how many fit."""
        cap = self.cap.get(lid, 0)
        used = self.count.get(lid, 0)
        row = max(sum(layout.row_bytes), 1)
        while used + need > cap:
            rows = min(max(cap, 64), max(_CHUNK_BYTES // row, 1))
            if self.budget is not None:
                rows = min(rows, (self.budget - self.nbytes) // row)
            if rows <= 0:
                break
            chunk = [torch.empty((rows, *s), dtype=d, pin_memory=self.pin)
                     for s, d in zip(layout.shapes, layout.dtypes, strict=True)]
            self.layouts[lid] = layout
            self.chunks.setdefault(lid, []).append(chunk)
            self.starts.setdefault(lid, []).append(cap)
            cap += rows
            self.nbytes += rows * row
        self.cap[lid] = cap
        return max(0, min(need, cap - used))

    def put(self, lid: str, layout: _Layout, keys: list[bytes], rows: list[torch.Tensor]) -> int:
        """Store as many rows as the budget allows; return how many were stored."""
        n = self._grow(lid, layout, len(keys))
        if n <= 0:
            return 0
        start = self.count.get(lid, 0)
        starts = self.starts[lid]
        done = 0
        while done < n:
            slot = start + done
            c = bisect.bisect_right(starts, slot) - 1
            chunk = self.chunks[lid][c]
            local = slot - starts[c]
            k = min(n - done, chunk[0].shape[0] - local)
            for dst, src in zip(chunk, rows, strict=True):
                dst[local:local + k].copy_(src[done:done + k])
            done += k
        for i, key in enumerate(keys[:n]):
            self.index[key] = (lid, start + i)
        self.count[lid] = start + n
        return n

    def _merge(self, lid: str) -> None:
        """Copy a layout's chunks into one tensor per leaf (same capacity)."""
        chunks = self.chunks[lid]
        merged = [torch.empty((self.cap[lid], *t.shape[1:]), dtype=t.dtype, pin_memory=self.pin) for t in chunks[0]]
        for start, chunk in zip(self.starts[lid], chunks, strict=True):
            for dst, src in zip(merged, chunk, strict=True):
                dst[start:start + src.shape[0]].copy_(src)
        self.chunks[lid] = [merged]
        self.starts[lid] = [0]

    def get(self, lid: str, slots: list[int], device: torch.device) -> list[torch.Tensor]:
        """The rows at ``slots``, in that order, on ``device``.

        A hit batch that spans several chunks first merges them into one
        tensor per leaf (chunks are added at doubling sizes, so this happens a
        logarithmic number of times, each time the stored rows exist twice for
        a moment; past ``_MERGE_BYTES`` rows are stacked from the chunks
        instead); then each leaf is one ``index_select`` into a (pinned, on
        CUDA) staging buffer and one transfer to ``device``.
        """
        starts = self.starts[lid]
        first = bisect.bisect_right(starts, min(slots)) - 1
        if bisect.bisect_right(starts, max(slots)) - 1 != first:
            if self.nbytes > _MERGE_BYTES:  # too big to copy again: one row view per sample
                chunks = self.chunks[lid]
                where = [(c, slot - starts[c]) for c, slot in
                         zip((bisect.bisect_right(starts, slot) - 1 for slot in slots), slots, strict=True)]
                out = []
                for j, t in enumerate(chunks[0]):
                    dst = torch.empty((len(slots), *t.shape[1:]), dtype=t.dtype, pin_memory=self.pin)
                    torch.stack([chunks[c][j][r] for c, r in where], out=dst)
                    out.append(dst.to(device, non_blocking=True))
                return out
            self._merge(lid)
            first = 0
        start = self.starts[lid][first]
        idx = torch.tensor(slots, dtype=torch.long)
        if start:
            idx -= start
        out = []
        for src in self.chunks[lid][first]:
            dst = torch.empty((len(slots), *src.shape[1:]), dtype=src.dtype, pin_memory=self.pin)
            torch.index_select(src, 0, idx, out=dst)
            out.append(dst.to(device, non_blocking=True))
        return out


class _DiskStore:
    """Memory-mapped feature files under ``root``, one directory per weight digest.

    Per layout ``L``: ``L.json`` (structure), ``L.keys`` (16-byte keys in slot
    order) and ``L.<j>.bin`` (raw rows of output leaf ``j``). Rows are appended
    before their keys, so an interrupted write leaves rows without keys, which
    are ignored on reopening.
    """

    def __init__(self, root: str, budget: int | None) -> None:
        self.root = root
        self.budget = budget
        self.dir: str | None = None
        self.index: dict[bytes, tuple[str, int]] = {}
        self.layouts: dict[str, _Layout] = {}
        self.count: dict[str, int] = {}
        self.maps: dict[str, list[torch.Tensor | None]] = {}
        self.nbytes = 0

    def open(self, digest: str) -> None:
        self.dir = os.path.join(self.root, digest)
        os.makedirs(self.dir, exist_ok=True)
        self.index, self.layouts, self.count, self.maps, self.nbytes = {}, {}, {}, {}, 0
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json"):
                continue
            lid = name[:-5]
            try:
                with open(os.path.join(self.dir, name)) as f:
                    layout = _Layout.from_json(json.load(f))
            except (ValueError, KeyError, ImportError, AttributeError) as e:
                log.warning("ignoring unreadable cache layout %s: %s", name, e)
                continue
            keys_path = os.path.join(self.dir, lid + ".keys")
            keys = open(keys_path, "rb").read() if os.path.exists(keys_path) else b""
            n = len(keys) // 16
            for j, rb in enumerate(layout.row_bytes):
                leaf = os.path.join(self.dir, f"{lid}.{j}.bin")
                n = min(n, os.path.getsize(leaf) // max(rb, 1) if os.path.exists(leaf) else 0)
            self.layouts[lid] = layout
            self.count[lid] = n
            self.maps[lid] = [None] * len(layout.row_bytes)
            self.nbytes += n * sum(layout.row_bytes)
            for slot in range(n):
                self.index[keys[16 * slot:16 * slot + 16]] = (lid, slot)

    def close(self) -> None:
        self.maps = {lid: [None] * len(m) for lid, m in self.maps.items()}

    def put(self, lid: str, layout: _Layout, keys: list[bytes], rows: list[torch.Tensor]) -> int:
        assert self.dir is not None
        row = sum(layout.row_bytes)
        n = len(keys)
        if self.budget is not None:
            n = min(n, max(0, (self.budget - self.nbytes) // max(row, 1)))
        if n <= 0:
            return 0
        if lid not in self.layouts:
            with open(os.path.join(self.dir, lid + ".json"), "w") as f:
                json.dump(layout.to_json(), f)
            self.layouts[lid] = layout
            self.count[lid] = 0
            self.maps[lid] = [None] * len(layout.row_bytes)
        start = self.count[lid]
        for j, r in enumerate(rows):
            with open(os.path.join(self.dir, f"{lid}.{j}.bin"), "r+b" if start else "wb") as f:
                f.seek(start * layout.row_bytes[j])
                data = _as_bytes(r[:n].cpu())
                f.write(_buffer(data))
        with open(os.path.join(self.dir, lid + ".keys"), "ab") as f:
            f.write(b"".join(keys[:n]))
        for i, key in enumerate(keys[:n]):
            self.index[key] = (lid, start + i)
        self.count[lid] = start + n
        self.nbytes += n * row
        return n

    def get(self, lid: str, slots: list[int]) -> list[torch.Tensor]:
        assert self.dir is not None
        layout = self.layouts[lid]
        maps = self.maps[lid]
        idx = torch.tensor(slots, dtype=torch.long)
        out = []
        for j, (rb, shape, dtype) in enumerate(zip(layout.row_bytes, layout.shapes, layout.dtypes, strict=True)):
            mm = maps[j]
            if mm is None or mm.shape[0] < self.count[lid]:
                n = self.count[lid]
                # MAP_PRIVATE: nothing written through the map reaches the file
                mm = torch.from_file(os.path.join(self.dir, f"{lid}.{j}.bin"), shared=False,
                                     size=n * rb, dtype=torch.uint8).view(n, rb)
                maps[j] = mm
            rows = mm.index_select(0, idx)
            out.append(rows.view(dtype).reshape(len(slots), *shape))
        return out


# --------------------------------------------------------------------------- the cache


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


class _CachedMixin:
    """Methods added to a cached module's class (see :func:`cache`)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_lf_cache"](args, kwargs)

    def stats(self) -> CacheStats:
        """Hits, misses, bytes held in memory and on disk (see :class:`CacheStats`)."""
        return self.__dict__["_lf_cache"].stats()

    def clear_cache(self) -> None:
        """Forget every stored feature of the current weights (disk files of a
        temporary spill directory included; a ``path`` given by the user keeps
        its files, which stay valid for these weights)."""
        self.__dict__["_lf_cache"].invalidate()

    def verify_cache(self) -> bool:
        """Compare the weights' content with the fingerprint taken when the cache
        was filled; drop the cache if they differ. Returns whether it was valid."""
        return bool(self.__dict__["_lf_cache"].verify())


_CLASSES: dict[type, type] = {}


def _cached_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Cached{cls.__name__}", (_CachedMixin, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def is_cached(module: nn.Module) -> bool:
    """Whether ``module`` was wrapped by :func:`cache`."""
    return "_lf_cache" in module.__dict__


def cache(
    module: nn.Module,
    *,
    store: str = "memory",
    max_bytes: int | None = None,
    path: str | os.PathLike[str] | None = None,
    verify_every: int = 100,
) -> nn.Module:
    """Cache a frozen submodule's output per sample: compute once, then look up.

    The module object itself is returned, its class swapped for a subclass
    whose ``forward`` consults the cache (as ``torch.nn.utils.parametrize``
    does), so parameter names, the state dict, ``isinstance`` checks and
    selectors are unchanged: ``model.bert = lf.cache(model.bert)`` is the same
    object as ``model.bert``.

    Args:
        module: the submodule to cache; it must be frozen in eval mode when
            called (``lf.freeze(model, "bert", mode="eval")``), otherwise it is
            computed normally with a warning.
        store: ``"memory"``: host memory (pinned when the module runs on CUDA);
            with ``max_bytes``, samples past the bound *spill to disk* (under
            ``path``, or a temporary directory removed when the cache goes).
            ``"disk"``: memory-mapped files under ``path``, written as features
            are produced, in a directory named by a hash of the weights: a new
            process with the same weights reuses them, changed weights do not.
        max_bytes: bound on feature bytes in memory (``"memory"``) or on disk
            (``"disk"``; past it, samples are computed and not stored).
        path: directory of the disk store (required for ``"disk"``).
        verify_every: take an exact fingerprint of the weights every this many
            calls to catch edits that bypass version counters (``.data``); 0
            turns it off.

    Returns:
        ``module``, now cached, with ``stats()``, ``clear_cache()`` and
        ``verify_cache()``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: an unknown store, ``"disk"`` without ``path``, a bad
            ``max_bytes``, or a module that is already cached.

    Example:
        >>> import torch, torch.nn as nn, layerfreeze as lf
        >>> enc = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        >>> _ = lf.freeze(enc, mode="eval")
        >>> enc = lf.cache(enc)
        >>> x = torch.randn(6, 4)
        >>> torch.equal(enc(x), enc(x.flip(0)).flip(0))
        True
        >>> s = enc.stats(); (s.hits, s.misses)
        (6, 6)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"lf.cache expects an nn.Module, got {type(module).__name__}")
    if store not in _STORES:
        raise ValueError(f"store={store!r} is not one of 'memory', 'disk'")
    if store == "disk" and path is None:
        raise ValueError("store='disk' needs a directory: pass path=... (it is created if missing)")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
    if not isinstance(verify_every, int) or verify_every < 0:
        raise ValueError(f"verify_every must be a non-negative int, got {verify_every!r}")
    if is_cached(module):
        raise ValueError(f"{type(module).__name__} is already cached; use that module as it is")
    if "forward" in module.__dict__:
        raise ValueError("the module has a per-instance forward attribute; cache a module without one")
    cls = type(module)
    original = cls.forward

    def run(*args: Any, **kwargs: Any) -> Any:
        return original(module_ref(), *args, **kwargs)

    module_ref = weakref.ref(module)
    module.__dict__["_lf_cache"] = _FeatureCache(
        module, run, store, max_bytes, None if path is None else os.fspath(path), verify_every
    )
    module.__class__ = _cached_class(cls)
    return module


def precompute(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> dict[str, CacheStats]:
    """Fill every cache inside ``model`` with one pass over ``loader``.

    Runs under ``torch.no_grad()``. When each cache is called once per batch
    (checked on the first batch), the rest of the model's forward is skipped
    once the features are stored, so the pass costs about as much as running
    the cached modules alone, plus the rest of the model's forward on the
    first batch (the check).

    Args:
        model: a model holding modules wrapped by :func:`cache`.
        loader: an iterable of batches (a ``DataLoader``).
        forward: ``forward(model, batch)``; default ``model(**batch)`` for a
            dict batch and ``model(batch)`` otherwise.
        progress: show a progress bar (tqdm, else rich, if installed).

    Returns:
        Stats of each cache after the pass, by module name.

    Raises:
        ValueError: ``model`` holds no cached module, or a cached module is not
            frozen in eval mode (nothing is run then).
    """
    caches = {name: m.__dict__["_lf_cache"] for name, m in model.named_modules() if is_cached(m)}
    if not caches:
        raise ValueError("precompute: the model holds no cached module; wrap the frozen part first, "
                         "e.g. model.encoder = lf.cache(model.encoder)")
    for name, c in caches.items():
        reason = c._why_not([])
        if reason is not None:
            raise ValueError(f"precompute: cached module {name or '(root)'!r} cannot be cached: {reason}")
    if forward is None:
        def forward(m: nn.Module, batch: Any) -> Any:
            return m(**batch) if isinstance(batch, dict) else m(batch)
    for c in caches.values():
        c.verify()
    calls = {id(c): c.calls + c.bypassed for c in caches.values()}
    bar = _progress(loader, progress)
    early = False
    try:
        with torch.no_grad():
            for i, batch in enumerate(bar):
                try:
                    forward(model, batch)
                except _StopForward:
                    pass
                if i == 0:
                    once = all(c.calls + c.bypassed - calls[id(c)] == 1 for c in caches.values())
                    early = once and len(caches) == 1
                    for c in caches.values():
                        c.stop_after = early
    finally:
        for c in caches.values():
            c.stop_after = False
        close = getattr(bar, "close", None)
        if callable(close):
            close()
    return {name: c.stats() for name, c in caches.items()}


def _progress(loader: Iterable[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return loader
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    try:
        from tqdm.auto import tqdm

        return tqdm(loader, total=total, desc="precompute", leave=False)
    except ImportError:
        pass
    try:
        from rich.progress import track

        return track(loader, total=total, description="precompute")
    except ImportError:
        return loader
