"""What decides a cached module's output besides its input, in two checks.

Every call compares a cheap token (see ``_FeatureCache._scan``). The deep
check here runs when the cache is first filled, when a sample is looked up
again since the last deep check (so at least once per epoch), every
``verify_every`` calls and on ``verify_cache()``: an exact fingerprint of every
parameter and buffer (:func:`fingerprints`, which catches edits through
``.data`` that no version counter sees) and a digest of the module tree: each
submodule's name and class, its plain configuration attributes (numbers,
strings, flags, dtypes, functions by name) and the code of its ``forward``.
"""

from __future__ import annotations

import hashlib
import inspect
import marshal
import types
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..guard import _ROW, _SMALL, _grid, _words

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_CODE_DIGESTS: dict[Any, bytes] = {}
# words per slice of a large tensor's fingerprint (a multiple of the grid's row of 128)
_SLICE = 1 << 20


def fingerprints(tensors: list[torch.Tensor], memo: dict[int, tuple[int, list[torch.Tensor]]] | None = None,
                 ) -> torch.Tensor:
    """Exact integer sums of each tensor's storage, concatenated, on the CPU.

    The words of each tensor, read in memory order as the guard reads them
    (:mod:`layerfreeze.guard`), are laid out in rows of 128: the result holds
    every row sum and the tail words; a tensor of at most 4096 words gets its
    column sums too (its words zero-padded to whole rows; the small tensors of
    one word type are summed together, one row block each, in two kernels).
    One pass over the data (about a plain sum), and any changed value changes
    its row's sum, so an edit through ``.data`` is always seen. Values swapped
    between two rows change both sums; a swap within one row of 128 words is
    seen in tensors of up to 4096 words only.

    Args:
        tensors: parameters and buffers, any dtype or layout.
        memo: the word counts and sums of large tensors read earlier at the same
            moment, by ``id`` (read and filled); only for reads between which no
            value can move.

    Returns:
        A 1-D int64 tensor; two calls return equal tensors exactly when no
        value moved (up to the swap noted above).

    Example:
        >>> import torch
        >>> w = torch.randn(1000, 10)
        >>> before = fingerprints([w])
        >>> w.data[7, 3] += 1
        >>> torch.equal(fingerprints([w]), before)
        False
    """
    sizes = [len(tensors)]
    small: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    parts: list[torch.Tensor] = []
    for t in tensors:
        got = memo.get(id(t)) if memo is not None else None
        if got is None:
            w = _words(t)[0]
            n = w.numel()
            if n <= _SMALL:
                sizes.append(n)
                small.setdefault((w.dtype, w.device), []).append(w)
                continue
            got = n, _large(w)
            if memo is not None:
                memo[id(t)] = got
        sizes.append(got[0])
        parts += got[1]
    for words in small.values():
        parts.append(_small(words).cpu())
    return torch.cat([torch.tensor(sizes, dtype=torch.int64), *parts])


def _small(words: list[torch.Tensor]) -> torch.Tensor:
    """Row and column sums of each small tensor's words (of one type): the ``k`` tensors
    zero-padded to the longest one's whole rows, ``[k, rows, 128]``, summed over each axis at once."""
    block = pad_sequence([w.reshape(-1) for w in words], batch_first=True, padding_value=0)
    rows = -(-block.shape[1] // _ROW)
    if block.shape[1] != rows * _ROW:
        block = torch.nn.functional.pad(block, (0, rows * _ROW - block.shape[1]))
    grid = block.view(len(words), rows, _ROW)
    return torch.cat([grid.sum(2, dtype=torch.int64).reshape(-1), grid.sum(1, dtype=torch.int64).reshape(-1)])


def _large(w: torch.Tensor) -> list[torch.Tensor]:
    """A large tensor's row sums and tail words."""
    n = w.numel()
    parts = []
    # in slices (whole rows): a slice of narrow words widened to int64 stays small
    for i in range(0, n, _SLICE):
        head, tail = _grid(w[i : i + _SLICE])
        parts.append(head.sum(1, dtype=torch.int64).cpu())
        if tail.numel():
            parts.append(tail.to(torch.int64).cpu())
    return parts


def _code_digest(fn: Any) -> bytes:
    """A digest of a function's code, following ``__wrapped__`` (decorators); a
    callable object is read as its class's ``__call__``. The same code gives the
    same digest in every process (a disk store is found again by it)."""
    got = _CODE_DIGESTS.get(fn) if isinstance(fn, types.FunctionType) else None
    if got is not None:
        return got
    h = hashlib.blake2b(digest_size=16)
    seen = 0
    f = fn
    while f is not None and seen < 8:
        f = getattr(f, "__func__", f)
        code = getattr(f, "__code__", None)
        if not isinstance(code, types.CodeType) and not isinstance(f, type):
            call = next((c.__dict__["__call__"] for c in type(f).__mro__ if "__call__" in c.__dict__), None)
            code = getattr(call, "__code__", None)
            h.update(f"{type(f).__module__}.{type(f).__qualname__}".encode())
        if isinstance(code, types.CodeType):
            h.update(marshal.dumps(code))
        else:
            h.update(repr(f).encode())
        f = getattr(f, "__wrapped__", None)
        seen += 1
    got = h.digest()
    if isinstance(fn, types.FunctionType):  # only functions: a bound method or an object holds its module
        _CODE_DIGESTS[fn] = got
    return got


def _plain(v: Any) -> Any:
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v):
        return tuple(v)
    if isinstance(v, dict) and all(isinstance(k, _PLAIN) and isinstance(x, _PLAIN) for k, x in v.items()):
        return tuple(sorted(v.items(), key=repr))
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
        return f"{getattr(v, '__module__', '')}.{v.__qualname__}"
    return None


def structure_digest(module: nn.Module, base: type, ignore: tuple[type, ...] = ()) -> str:
    """A digest of the module tree: names, classes, plain configuration, forward code
    (an instance ``forward`` of a type in ``ignore`` is left out: the library's own)."""
    h = hashlib.blake2b(digest_size=16)
    for name, m in module.named_modules():
        cls = base if m is module else type(m)
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|".encode())
        h.update(_code_digest(getattr(cls, "forward", None)))
        own = m.__dict__.get("forward")
        if own is not None and not isinstance(own, ignore):
            h.update(_code_digest(own))
        h.update(own_config(m).encode())
    return h.hexdigest()


def own_config(m: nn.Module, only: frozenset[str] | None = None) -> str:
    """A module's own plain configuration attributes (not its submodules'), as text;
    with ``only``, those of these names."""
    out = []
    for k in sorted(m.__dict__):
        if k.startswith("_") or k == "training" or (only is not None and k not in only):
            continue
        v = _plain(m.__dict__[k])
        if v is not None:
            out.append(f"{k}={v!r};")
    return "".join(out)


_READ: dict[type, frozenset[str] | None] = {}


def read_names(cls: type) -> frozenset[str] | None:
    """The names a module class's ``forward`` reads, with those of the methods of the
    class it calls by name (and theirs): the attributes it may read through ``self.<name>``.
    None when some code cannot be read (a builtin or a compiled forward)."""
    if cls in _READ:
        return _READ[cls]
    names: set[str] = set()
    seen: set[int] = set()
    todo = [getattr(cls, "forward", None)]
    ok = True
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        try:
            fn = inspect.unwrap(fn)
        except ValueError:
            pass
        code = getattr(fn, "__code__", None)
        if not isinstance(code, types.CodeType):
            ok = False
            break
        codes = [code]
        while codes:
            c = codes.pop()
            names.update(c.co_names)
            codes += [k for k in c.co_consts if isinstance(k, types.CodeType)]
        for n in code.co_names:
            attr = inspect.getattr_static(cls, n, None)
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if isinstance(attr, types.FunctionType) and not attr.__module__.startswith("torch."):
                todo.append(attr)
    got = frozenset(names) if ok else None
    _READ[cls] = got
    return got
