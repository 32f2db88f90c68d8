"""What decides a cached module's output besides its input, in two checks.

Every call compares a cheap token (see ``_FeatureCache._scan``). The deep
check here runs when the cache is first filled, when a sample is looked up
again since the last deep check (so at least once per epoch), every
``verify_every`` calls and on ``verify_cache()``: an exact fingerprint of every
parameter and buffer (:func:`layerfreeze.guard.fingerprint`, which catches
edits through ``.data`` that no version counter sees) and a digest of the
module tree: each submodule's name and class, its plain configuration
attributes (numbers, strings, flags, dtypes, functions by name) and the code
of its ``forward``.
"""

from __future__ import annotations

import hashlib
import marshal
import types
from typing import Any

import torch
from torch import nn

from ..guard import fingerprint

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_CODE_DIGESTS: dict[Any, bytes] = {}


def fingerprints(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One exact int64 fingerprint per tensor, on the CPU."""
    # in slices: summing a whole embedding matrix as int64 would briefly
    # take twice its size; integer sums of slices add up to the same value
    prints = [torch.stack([fingerprint(c) for c in t.detach().reshape(-1).split(1 << 20)]).sum().cpu()
              if t.numel() else torch.zeros((), dtype=torch.int64) for t in tensors]
    return torch.stack(prints) if prints else torch.zeros(0, dtype=torch.int64)


def _code_digest(fn: Any) -> bytes:
    """A digest of a function's code, following ``__wrapped__`` (decorators)."""
    got = _CODE_DIGESTS.get(fn)
    if got is not None:
        return got
    h = hashlib.blake2b(digest_size=16)
    seen = 0
    f = fn
    while f is not None and seen < 8:
        f = getattr(f, "__func__", f)
        code = getattr(f, "__code__", None)
        if isinstance(code, types.CodeType):
            h.update(marshal.dumps(code))
        else:
            h.update(repr(f).encode())
        f = getattr(f, "__wrapped__", None)
        seen += 1
    got = h.digest()
    try:
        _CODE_DIGESTS[fn] = got
    except TypeError:
        pass
    return got


def _plain(v: Any) -> Any:
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v):
        return tuple(v)
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
        return f"{getattr(v, '__module__', '')}.{v.__qualname__}"
    return None


def structure_digest(module: nn.Module, base: type) -> str:
    """A digest of the module tree: names, classes, plain configuration, forward code."""
    h = hashlib.blake2b(digest_size=16)
    for name, m in module.named_modules():
        cls = base if m is module else type(m)
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|".encode())
        h.update(_code_digest(getattr(cls, "forward", None)))
        own = m.__dict__.get("forward")
        if own is not None:
            h.update(_code_digest(own))
        for k in sorted(m.__dict__):
            if k.startswith("_") or k == "training":
                continue
            v = _plain(m.__dict__[k])
            if v is not None:
                h.update(f"{k}={v!r};".encode())
    return h.hexdigest()
