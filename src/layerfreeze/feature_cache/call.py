"""The keyed call: validity checks, per-sample keys, the first check that a
module's rows are independent, lookups, computation of the missing samples
and assembly of the batch's output."""

from __future__ import annotations

import hashlib
import inspect
import logging
import shutil
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import keys as _keys
from .check import _batch_first_false, _FirstCheck, _moved, _Signature
from .disk import _DiskStore
from .layout import _flatten, _Layout, _layout_of, _rebuild, _unflatten
from .stores import _as_bytes, _buffer, _MemoryStore, _token_index
from .validity import fingerprints, structure_digest

log = logging.getLogger("layerfreeze")


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


class _StopForward(Exception):
    """Raised by a cache during :func:`precompute` once its features are stored."""


def _positional_names(base: type) -> list[str]:
    """Names of ``base.forward``'s positional parameters after ``self`` (so that
    ``encoder(ids, mask)`` finds ``attention_mask`` as ``encoder(ids, attention_mask=mask)`` does)."""
    try:
        params = list(inspect.signature(base.forward).parameters.values())[1:]  # type: ignore[attr-defined]
    except (TypeError, ValueError, AttributeError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def _first_of_each(layout: _Layout, keys: list[bytes], rows: list[torch.Tensor],
                   counts: list[int]) -> tuple[list[bytes], list[torch.Tensor], list[int]]:
    """Keep the first of samples that share a key (a batch holding one sample twice,
    or a data set with repeated rows): each is stored once, not once per copy."""
    first: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    if len(first) == len(keys):
        return keys, rows, counts
    keep = sorted(first.values())
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    kept = []
    for r, t in zip(rows, layout.token, strict=True):
        idx = (_token_index([starts[i] for i in keep], [counts[i] for i in keep], r.device) if t
               else torch.tensor(keep, dtype=torch.long, device=r.device))
        kept.append(r.index_select(0, idx))
    return [keys[i] for i in keep], kept, [counts[i] for i in keep]


class _FeatureCache(_FirstCheck):
    """The cache of one module; ``config`` holds the arguments of :func:`cache`."""

    def __init__(self, module: nn.Module, base: type, config: dict[str, Any]) -> None:
        self._module = weakref.ref(module)
        self.base = base
        self.config = config
        self.name = base.__qualname__
        self.verify_every: int = config["verify_every"]
        self.padding: str | None = config["padding"]
        self.pad_value = config["pad_value"]
        self.key = config["key"]
        self.store_dtype: torch.dtype | None = config["dtype"]
        bd = config["batch_dim"]
        if bd is None:
            # a PyTorch layer with batch_first=False takes (sequence, batch, ...)
            own = base.__module__.startswith("torch.nn") and _batch_first_false(module)
            bd = 1 if own else 0
        self.batch_dim: int = bd
        self._positional = _positional_names(base)
        self.hits = self.misses = self.bypassed = self.calls = 0
        self.lock = threading.RLock()
        self._warned: set[str] = set()
        self._token: tuple[Any, ...] | None = None
        self._prints: torch.Tensor | None = None
        self._struct: str | None = None
        self._seen: set[bytes] = set()
        self.sigs: dict[bytes, _Signature] = {}
        self._flags: dict[bytes, tuple[bool, ...] | None] = {}  # per-token flags found before the first check
        self.memory: _MemoryStore | None = None
        self.disk: _DiskStore | None = None
        self._tmp: str | None = None
        path, max_bytes = config["path"], config["max_bytes"]
        if config["store"] == "memory":
            self.memory = _MemoryStore(max_bytes)
            if max_bytes is not None:
                root = path
                if root is None:
                    root = self._tmp = tempfile.mkdtemp(prefix="layerfreeze-cache-")
                    weakref.finalize(self, shutil.rmtree, root, True)
                self.disk = _DiskStore(root, None)
        else:
            self.disk = _DiskStore(path, max_bytes)
        # precompute() sets this to stop the model's forward once the feature is stored
        self.stop_after: bool = False

    @property
    def module(self) -> nn.Module:
        m = self._module()
        assert m is not None
        return m

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The module's own forward (its class's, looked up now: new code runs and is seen)."""
        return self.base.forward(self.module, *args, **kwargs)  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- validity

    def _scan(self) -> tuple[tuple[Any, ...], bool]:
        token, hooks, unsafe = self._scan_all()
        return (token, hooks), unsafe

    def _scan_all(self) -> tuple[tuple[Any, ...], tuple[Any, ...], bool]:
        """One pass over the module tree, run every call: a token of everything
        cheap to compare (module objects and classes, instance forwards, hooks,
        parameter and buffer objects, data pointers and version counters) and
        whether anything is in training mode or requires grad."""
        token, _, hooks, unsafe = self._walk()
        return token, hooks, unsafe

    def _walk(self) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...], bool]:
        """:meth:`_scan_all`'s pass, also returning the tree's *structure*: which module,
        parameter and buffer objects sit where (the token without pointers and versions)."""
        token: list[Any] = []
        structure: list[Any] = []
        hooks: list[Any] = []
        unsafe = False
        stack = [self.module]
        seen: set[int] = set()
        add, shape = token.extend, structure.extend
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            ident = (id(m), m.__class__, m.__dict__.get("forward"))
            add(ident)
            shape(ident)
            if m._forward_hooks or m._forward_pre_hooks:
                hooks += (id(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
            unsafe = unsafe or m.training
            for k, p in m._parameters.items():
                if p is not None:
                    add((id(p), p.data_ptr(), p._version))
                    shape((k, id(p)))
                    unsafe = unsafe or p.requires_grad
            for k, b in m._buffers.items():
                if b is not None:
                    add((id(b), b.data_ptr(), b._version))
                    shape((k, id(b)))
            children = [c for c in m._modules.values() if c is not None]
            shape([id(c) for c in children])
            stack.extend(children)
        # hooks set on every module (nn.modules.module.register_module_forward_hook) change outputs too
        token.append((tuple(_module._global_forward_hooks), tuple(_module._global_forward_pre_hooks)))
        return tuple(token), tuple(structure), tuple(hooks), unsafe

    def _fingerprints(self) -> torch.Tensor:
        return fingerprints(self._tensors())

    def _structure(self) -> str:
        return structure_digest(self.module, self.base)

    def _remember(self, keys: list[bytes]) -> None:
        """Note the samples of a call: one seen again makes the next deep check due."""
        self._seen.update(keys)

    def _tensors(self) -> list[torch.Tensor]:
        m = self.module
        return [t for _, t in m.named_parameters()] + [t for _, t in m.named_buffers()]

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

    def _digest(self, struct: str) -> str:
        """Content hash of the weights, their names, and the module tree: the disk directory."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"layerfreeze-cache {_keys._FORMAT} {struct}".encode())
        for name, t in list(self.module.named_parameters()) + list(self.module.named_buffers()):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            data = _as_bytes(t.detach().cpu().reshape(1, -1))
            h.update(_buffer(data))
        return h.hexdigest()

    def invalidate(self, token: tuple[Any, ...] | None = None) -> None:
        """Drop everything held for the current module state and re-key to it."""
        if token is None:
            token = self._scan()[0]
        if self.memory is not None:
            self.memory.clear()
        self.sigs.clear()
        self._flags.clear()
        self._seen.clear()
        struct = self._structure()
        if self.disk is not None:
            if self._tmp is not None and self.disk.dir is not None:
                shutil.rmtree(self.disk.dir, ignore_errors=True)
            try:
                self.disk.open(self._digest(struct))
            except (OSError, RuntimeError) as e:
                self._disk_down(e)
        self._token = token
        self._prints = None
        self._struct = struct

    def verify(self) -> bool:
        """Check weights (exact fingerprint) and module tree (classes, configuration,
        forward code) against what they were when the cache was filled.

        Returns:
            True if the cache was still valid; False if it was dropped.
        """
        token = self._scan()[0]
        if self._token != token:
            self.invalidate(token)
            return False
        now = self._fingerprints()
        struct = self._structure()
        if self._prints is not None and (not torch.equal(now, self._prints) or struct != self._struct):
            log.info("cached module changed in place (weights through .data, or its configuration): cache dropped")
            self.invalidate(token)
            self._prints = now
            return False
        self._prints, self._struct = now, struct
        return True

    def _warn(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"layerfreeze cache of {self.name}: {reason}; computing normally, not cached",
                          stacklevel=5)

    def _bypass(self, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._warn(reason)
        self.bypassed += 1
        return self.run(args, kwargs)

    # ---------------------------------------------------------------- the call

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self.lock:
            return self._call(args, kwargs)

    def _pop_ids(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        """Take the ``key=`` ids out of the call (a keyword, or an entry of a dict argument); ids
        passed by position (a parameter of the forward of that name) are read and left in place."""
        if callable(self.key):
            return args, kwargs, self.key(args, kwargs)
        name = self.key
        if name in kwargs:
            kwargs = dict(kwargs)
            return args, kwargs, kwargs.pop(name)
        new_args = []
        ids = None
        for a in args:
            if ids is None and isinstance(a, dict) and name in a:
                ids = a[name]
                a = {k: v for k, v in a.items() if k != name}
            new_args.append(a)
        if ids is None and name in self._positional:
            at = self._positional.index(name)
            if at < len(args):
                ids = args[at]
        return tuple(new_args), kwargs, ids

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        token, unsafe = self._scan()
        call_args, call_kwargs = args, kwargs
        ids: Any = None
        if self.key is not None:
            args, kwargs, ids = self._pop_ids(args, kwargs)
        leaves: list[Any] = []
        names: list[str | None] = []
        pos = self._positional
        arg_specs = tuple(_flatten(a, leaves, names, pos[i] if i < len(pos) else None) for i, a in enumerate(args))
        spec = ("seq", tuple, (("seq", tuple, arg_specs), _flatten(kwargs, leaves, names)))
        if unsafe or any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves):
            reason = self._why_not(leaves)
            if reason is not None:
                return self._bypass(reason, args, kwargs)
        batch = _keys.prepare(leaves, names, spec, batch_dim=self.batch_dim, padding=self.padding,
                              pad_value=self.pad_value)
        if isinstance(batch, str):
            return self._bypass(batch, args, kwargs)
        if batch.size == 0:  # nothing to look up
            return self.run(args, kwargs)
        if self.key is not None:
            if ids is None:
                return self._bypass(f"no key ids: the call has no argument or dict entry {self.key!r}", args, kwargs)
            id_list = _keys.id_bytes(ids, batch.size)
            if isinstance(id_list, str):
                return self._bypass(id_list, args, kwargs)
            ids = id_list
        sig_id = _keys.signature(batch)
        sig = self.sigs.get(sig_id)
        if sig is not None and sig.status == "dependent":
            return self._bypass(sig.reason, args, kwargs)
        padded = batch.length is not None and (sig is None or sig.status == "padded")
        keys = _keys.sample_keys(batch, padded, ids)

        if self._token != token:
            self.invalidate(token)
        self.calls += 1
        if (self.verify_every and self.calls % self.verify_every == 0) or not self._seen.isdisjoint(keys):
            # a sample seen again since the last check: an epoch has passed, check the weights' content
            self.verify()
            self._seen.clear()
        self._remember(keys)

        found = self._lookup(keys)
        miss = [i for i, f in enumerate(found) if f is None]
        if len({f[1] for f in found if f is not None}) > 1:  # two layouts in one batch: compute all afresh
            miss = list(range(batch.size))
        device = batch.rows[0].device
        size = batch.size
        if not miss:
            self.hits += size
            if self.stop_after:
                raise _StopForward
            return self._assemble(batch, padded, found, [], None, None, device)

        sub_args, sub_kwargs = (args, kwargs) if len(miss) == size else self._take(leaves, spec, batch, miss)
        computed = self.run(sub_args, sub_kwargs)
        after = self._scan()[0] if sig is None else token  # a signature's first calls install such hooks
        if after != token and after[0] == token[0]:
            # hooks the module installed on itself while running (transformers does,
            # to record hidden states): part of its behaviour from now on
            self._token = token = after
        if sig is None and len(miss) >= 2:
            sig = self._check(batch, leaves, spec, miss, computed)
            self.sigs[sig_id] = sig
            if sig.status == "dependent":
                self._warn(sig.reason)
                self.bypassed += 1
                return computed if len(miss) == size else self.run(args, kwargs)
            if padded and sig.status != "padded":
                return self._call(call_args, call_kwargs)  # once per signature: re-key whole rows
        norm = _moved(computed, self.batch_dim, 0)
        token_flags = None
        if padded:
            if sig is not None:
                token_flags = sig.token
            else:
                hit_layout = self._layout_of_found(found)
                if hit_layout is not None:
                    token_flags = hit_layout.token
                else:  # one new sample, not checked yet: which outputs are per token?
                    if sig_id not in self._flags:
                        self._flags[sig_id] = self._padding_flags(batch, leaves, spec, miss[:1], computed)
                    token_flags = self._flags[sig_id]
            if token_flags is None:  # its real tokens see its padding: served whole, as computed
                self.misses += len(miss)
                return computed if len(miss) == size else self.run(args, kwargs)
        got = _layout_of(norm, len(miss), batch.length, token_flags, self.store_dtype)
        if isinstance(got, str):
            self._warn(got)
            self.bypassed += 1
            return computed if len(miss) == size else self.run(args, kwargs)
        layout, fresh = got
        hit_layout = self._layout_of_found(found)
        if hit_layout is not None and (hit_layout.spec, hit_layout.shapes, hit_layout.dtypes, hit_layout.token) != (
                layout.spec, layout.shapes, layout.dtypes, layout.token):
            self.misses += size
            return self.run(args, kwargs)
        self.misses += len(miss)
        rows = self._rows(batch, padded, layout, fresh, miss)
        if sig is not None:  # stored only once the signature is checked
            self._store(layout, [keys[i] for i in miss], rows, [batch.counts[i] for i in miss] if padded
                        else [0] * len(miss))
        self.hits += size - len(miss)
        if self.stop_after:
            raise _StopForward
        if len(miss) == size and not padded:
            return computed
        return self._assemble(batch, padded, found, miss, layout, rows, device)

    def _layout_of_found(self, found: list[Any]) -> _Layout | None:
        for f in found:
            if f is not None:
                store = self.memory if f[0] == "m" else self.disk
                assert store is not None
                return store.layouts[f[1]]
        return None

    def _lookup(self, keys: list[bytes]) -> list[Any]:
        """Per key: (store, layout id, slot, token offset, token count), or None."""
        found: list[Any] = [None] * len(keys)
        rest = list(range(len(keys)))
        if self.memory is not None:
            idx = self.memory.index
            for i in rest:
                got = idx.get(keys[i])
                if got is not None:
                    found[i] = ("m", *got)
            rest = [i for i in rest if found[i] is None]
        if rest and self.disk is not None and self.disk.dir is not None:
            try:
                got_all = self.disk.lookup([keys[i] for i in rest])
            except (OSError, RuntimeError) as e:
                self._disk_down(e)
                return found
            for i, got in zip(rest, got_all, strict=True):
                if got is not None:
                    found[i] = ("d", *got)
        return found

    def _disk_down(self, e: BaseException) -> None:
        """A disk store that cannot be opened or read (its index or files replaced by
        directories, its directory by a file): said once, then left out until the next
        weight version opens a directory of its own."""
        assert self.disk is not None
        self.disk.dir = None
        self.disk.close()
        self._warn(f"the disk store at {self.disk.root} cannot be used ({type(e).__name__}: {_why(e)}); "
                   "remove or repair it")

    def _rows(self, batch: _keys._Batch, padded: bool, layout: _Layout, fresh: list[torch.Tensor],
              miss: list[int]) -> list[torch.Tensor]:
        """What the store keeps of the computed samples: real-token rows back to back, or sample rows."""
        out = []
        idx = None
        for t, x in zip(layout.token, fresh, strict=True):
            x = x.detach()
            if padded and t:
                length = batch.length
                assert length is not None
                if idx is None:
                    idx = _token_index([k * length + batch.starts[i] for k, i in enumerate(miss)],
                                       [batch.counts[i] for i in miss], x.device)
                x = x.reshape(x.shape[0] * length, *x.shape[2:]).index_select(0, idx)
            out.append(x)
        return out

    def _store(self, layout: _Layout, keys: list[bytes], rows: list[torch.Tensor], counts: list[int]) -> None:
        if self._prints is None:
            self._prints = self._fingerprints()
        lid = layout.ident()
        keys, rows, counts = _first_of_each(layout, keys, rows, counts)
        done = 0
        if self.memory is not None:
            done = self.memory.put(lid, layout, keys, rows, counts)
        if done < len(keys) and self.disk is not None:
            if self.disk.dir is None:  # it could not be used: said when that was found
                return
            tok = sum(counts[:done])
            rest = [r[tok:] if t else r[done:] for r, t in zip(rows, layout.token, strict=True)]
            try:
                done += self.disk.put(lid, layout, keys[done:], rest, counts[done:])
            except (OSError, RuntimeError) as e:  # a full disk, a read-only directory: train on, store no more
                self._warn(f"the disk store at {self.disk.root} cannot be written ({_why(e)})")
                return
        if done < len(keys):
            self._warn("the cache is full (max_bytes reached) for further samples")

    def _assemble(self, batch: _keys._Batch, padded: bool, found: list[Any], miss: list[int],
                  layout: _Layout | None, rows: list[torch.Tensor] | None, device: torch.device) -> Any:
        """The batch's output: stored rows for hits, computed rows for misses; in a
        padded batch, positions outside each sample's real span hold zeros."""
        size = batch.size
        if padded and not miss and self.memory is not None and all(f[0] == "m" for f in found):
            assert batch.length is not None
            lid = found[0][1]
            outs = self.memory.padded(lid, [f[2] for f in found], [f[3] for f in found], [f[4] for f in found],
                                      batch.starts, batch.length, device)
            return _moved(_rebuild(self.memory.layouts[lid], outs), 0, self.batch_dim)
        hit = [i for i in range(size) if found[i] is not None]
        parts: list[torch.Tensor] | None = None
        if hit:
            layout = self._layout_of_found(found)
            parts = self._gather(found, hit, device)
        assert layout is not None
        length = batch.length
        outs = []
        hit_t = torch.tensor(hit, device=device) if hit and miss else None
        miss_t = torch.tensor(miss, device=device) if miss and hit else None
        tok_idx: dict[str, torch.Tensor] = {}
        for j, (t, shape, dtype) in enumerate(zip(layout.token, layout.shapes, layout.dtypes, strict=True)):
            if padded and t:
                assert length is not None
                full = torch.zeros((size, length, *shape), dtype=dtype, device=device)
                flat = full.view(size * length, *shape)
                for name, which, src in (("h", hit, parts), ("m", miss, rows)):
                    if not which:
                        continue
                    assert src is not None
                    if name not in tok_idx:
                        tok_idx[name] = _token_index([i * length + batch.starts[i] for i in which],
                                                     [batch.counts[i] for i in which], device)
                    flat.index_copy_(0, tok_idx[name], src[j].to(device=device, dtype=dtype))
                outs.append(full)
            elif not miss:
                assert parts is not None
                outs.append(parts[j])
            elif not hit:
                assert rows is not None
                outs.append(rows[j])
            else:
                assert parts is not None and rows is not None and hit_t is not None and miss_t is not None
                full = torch.empty((size, *shape), dtype=dtype, device=device)
                full.index_copy_(0, hit_t, parts[j])
                full.index_copy_(0, miss_t, rows[j].to(device=device, dtype=dtype))
                outs.append(full)
        return _moved(_rebuild(layout, outs), 0, self.batch_dim)

    def _gather(self, found: list[Any], hit: list[int], device: torch.device) -> list[torch.Tensor]:
        in_mem = [i for i in hit if found[i][0] == "m"]
        on_disk = [i for i in hit if found[i][0] == "d"]
        lid = found[hit[0]][1]

        def get(store: Any, which: list[int]) -> list[torch.Tensor]:
            return store.get(lid, [found[i][2] for i in which], [found[i][3] for i in which],
                             [found[i][4] for i in which], device)

        if not on_disk:
            return get(self.memory, hit)
        if not in_mem:
            return get(self.disk, hit)
        a, b = get(self.memory, in_mem), get(self.disk, on_disk)
        layout = self._layout_of_found([found[hit[0]]])
        assert layout is not None
        # put the two parts back in batch order
        order = in_mem + on_disk
        pos = {i: k for k, i in enumerate(order)}
        sample_order = torch.tensor([pos[i] for i in hit], device=device)
        counts = [found[i][4] for i in order]
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
        tok_order = _token_index([starts[pos[i]] for i in hit], [counts[pos[i]] for i in hit], device)
        return [torch.cat([x, y]).index_select(0, tok_order if t else sample_order)
                for x, y, t in zip(a, b, layout.token, strict=True)]

    def _take(self, leaves: list[Any], spec: Any, batch: _keys._Batch, rows: list[int]) -> tuple[Any, Any]:
        """The call's arguments for the samples at ``rows`` only."""
        picked = list(leaves)
        for pos, r in zip(batch.batched, batch.rows, strict=True):
            idx = torch.tensor(rows, device=r.device)
            x = r.index_select(0, idx)
            picked[pos] = x.movedim(0, batch.dim) if batch.dim else x
        args, kwargs = _unflatten(spec, picked)
        return tuple(args), dict(kwargs)

    def stats(self) -> CacheStats:
        mem = self.memory
        disk = self.disk
        entries = (len(mem.index) if mem else 0) + (len(disk.index) if disk else 0)
        return CacheStats(self.hits, self.misses, mem.nbytes if mem else 0, disk.nbytes if disk else 0,
                          entries, self.bypassed)


def _why(e: BaseException) -> str:
    """An error's reason in a few words: an OSError's ``strerror``, else its message's first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = str(e).splitlines()
    return lines[0] if lines else type(e).__name__
