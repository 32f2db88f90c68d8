"""How one kind of output is laid out: its nested structure, constant leaves,
and per-leaf row shape and dtype, and how a batch's output is split into
per-sample rows and rebuilt.

A leaf is either *per sample* (one row of shape ``shape[1:]`` per sample) or,
when the batch is padded, *per token* (``shape[1]`` is the padded length; one
row of shape ``shape[2:]`` per real token of the sample).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

_CONST_TYPES = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)


def _flatten(obj: Any, leaves: list[Any], names: list[str | None] | None = None, name: str | None = None) -> Any:
    """Collect the leaves of a nested output/argument; return its structure spec.

    ``names`` receives, per leaf, the nearest dict key (or keyword) above it.
    """
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        if names is not None:
            names.append(name)
        return ("T",)
    if isinstance(obj, dict):
        keys = list(obj.keys())
        return ("map", type(obj), tuple(keys), tuple(_flatten(obj[k], leaves, names, str(k)) for k in keys))
    if isinstance(obj, (tuple, list)):
        return ("seq", type(obj), tuple(_flatten(v, leaves, names, name) for v in obj))
    leaves.append(obj)
    if names is not None:
        names.append(name)
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


def _dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"cache layout names dtype {name!r}, which torch does not know")
    return d


@dataclass
class _Layout:
    """Structure of one kind of output.

    ``token[j]``: leaf ``j`` is per token (rows of ``shapes[j]`` per real
    token) rather than per sample. ``dtypes``: what the module returned;
    ``stored``: what the store keeps (another dtype only with ``dtype=``).
    """

    spec: Any
    consts: tuple[Any, ...]  # non-tensor leaves (None where a tensor goes)
    is_tensor: tuple[bool, ...]
    token: tuple[bool, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    stored: tuple[torch.dtype, ...]

    def _bytes(self, per_token: bool) -> list[int]:
        return [math.prod(s) * torch.empty((), dtype=d).element_size() if t == per_token else 0
                for s, d, t in zip(self.shapes, self.stored, self.token, strict=True)]

    @property
    def token_bytes(self) -> list[int]:
        """Bytes per real token of each leaf (0 for per-sample leaves)."""
        return self._bytes(True)

    @property
    def sample_bytes(self) -> list[int]:
        """Bytes per sample of each leaf (0 for per-token leaves)."""
        return self._bytes(False)

    def ident(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": _spec_json(self.spec),
            "consts": [c if c is None or isinstance(c, (bool, int, float, str)) else repr(c) for c in self.consts],
            "is_tensor": list(self.is_tensor),
            "token": list(self.token),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "stored": [str(d).removeprefix("torch.") for d in self.stored],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Layout:
        return cls(
            _spec_from_json(data["spec"]),
            tuple(data["consts"]),
            tuple(data["is_tensor"]),
            tuple(data["token"]),
            tuple(tuple(s) for s in data["shapes"]),
            tuple(_dtype(d) for d in data["dtypes"]),
            tuple(_dtype(d) for d in data["stored"]),
        )


def _layout_of(out: Any, batch: int, length: int | None, token: tuple[bool, ...] | None,
               store_dtype: torch.dtype | None) -> tuple[_Layout, list[torch.Tensor]] | str:
    """The layout of a batch's output and its tensor leaves, or why it cannot be stored.

    ``length``: the padded length when the batch is padded; ``token``: which
    tensor leaves are per token (None: none).
    """
    leaves: list[Any] = []
    spec = _flatten(out, leaves)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors:
        return "the module returned no tensor"
    token = token if token is not None else (False,) * len(tensors)
    if len(token) != len(tensors):
        return "the module's output changed structure between calls"
    for x, t in zip(tensors, token, strict=True):
        if x.dim() == 0 or x.shape[0] != batch:
            return f"an output of shape {tuple(x.shape)} has no batch dimension of size {batch}"
        if t and (x.dim() < 2 or x.shape[1] != length):
            return f"an output of shape {tuple(x.shape)} has no token dimension of size {length}"
    consts: list[Any] = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            consts.append(None)
        elif isinstance(x, _CONST_TYPES):
            consts.append(x)
        else:
            return f"the output holds a {type(x).__name__}, which the cache cannot store"
    dtypes = tuple(x.dtype for x in tensors)
    stored = tuple(store_dtype if store_dtype is not None and d.is_floating_point else d for d in dtypes)
    layout = _Layout(spec, tuple(consts), tuple(isinstance(x, torch.Tensor) for x in leaves), tuple(token),
                     tuple(tuple(x.shape[2:] if t else x.shape[1:]) for x, t in zip(tensors, token, strict=True)),
                     dtypes, stored)
    return layout, tensors


def _rebuild(layout: _Layout, tensors: list[torch.Tensor]) -> Any:
    it = iter(tensors)
    return _unflatten(layout.spec, [next(it) if t else c for c, t in zip(layout.consts, layout.is_tensor, strict=True)])
