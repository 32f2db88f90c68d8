"""Per-sample keys: what makes two samples "the same" for a cached module.

A call is split into a *signature* (the structure of its arguments, their
dtypes and shapes past the batch and token dimensions, its non-tensor
arguments, the autocast state) and per-sample content. The key of a sample is
a BLAKE2b-128 hash of the signature and:

* without padding: the sample's row of every batched tensor argument;
* with padding (an ``attention_mask`` or the names given to :func:`cache`):
  the sample's real span (from its first to its last real token), the pad
  offset (where the span starts, so left padding with absolute positions never
  shares an entry across pad amounts) and the span's values in every per-token
  argument (a tensor whose dimension 1 is the padded length), plus the full
  row of every other batched argument;
* with ``key=``: the id the loader gives, plus the pad offset and span length.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

import torch

from .layout import _CONST_TYPES
from .stores import _as_bytes, _buffer

_FORMAT = 2


@dataclass
class _Batch:
    """One call, read as a batch of samples."""

    size: int
    dim: int  # the batch axis of the arguments
    batched: list[int]  # positions (in the call's leaves) of batched tensors
    rows: list[torch.Tensor]  # those tensors with the batch moved to dimension 0
    length: int | None  # padded length, when the call is padded
    mask_pos: int | None  # position of the mask/lengths leaf among ``batched``
    mask_kind: str  # "mask", "lengths", "pad_value" or ""
    pad_value: Any
    real: torch.Tensor | None  # [batch, length] bool, on the CPU
    starts: list[int]
    counts: list[int]
    token_arg: list[bool]  # per batched tensor: dimension 1 is the padded length
    signature: Any  # a blake2b object holding the signature


def _const_bytes(x: Any) -> bytes:
    return f"C{type(x).__name__}:{x!r}".encode()


def prepare(leaves: list[Any], names: list[str | None], spec: Any, *, batch_dim: int,
            padding: str | None, pad_value: Any) -> _Batch | str:
    """Read a call's leaves as a batch; a string says why they cannot be."""
    sig = hashlib.blake2b(digest_size=16)
    sig.update(f"layerfreeze-cache {_FORMAT} {spec!r} dim={batch_dim}".encode())
    for dev in ("cpu", "cuda"):
        if torch.is_autocast_enabled(dev):
            sig.update(f"autocast {dev} {torch.get_autocast_dtype(dev)}".encode())
    batched: list[int] = []
    rows: list[torch.Tensor] = []
    size = None
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            if x.dim() > batch_dim:
                r = x.movedim(batch_dim, 0) if batch_dim else x
                if size is None:
                    size = r.shape[0]
                elif r.shape[0] != size:
                    return f"tensor arguments disagree on the batch size ({size} and {r.shape[0]})"
                batched.append(i)
                rows.append(r)
            else:  # not batched: part of the signature, by value
                sig.update(f"T{i}{x.dtype}{tuple(x.shape)}".encode())
                sig.update(_buffer(_as_bytes(x.detach().cpu().reshape(1, -1))))
        elif isinstance(x, _CONST_TYPES):
            sig.update(_const_bytes(x))
        elif type(x).__module__ == "numpy" and getattr(x, "shape", None) == ():  # a numpy scalar
            sig.update(f"N{x.dtype}:{x.item()!r}".encode())
        else:
            return f"an argument of type {type(x).__name__} cannot be part of a cache key"
    if size is None:
        return f"no tensor argument has a batch dimension (dimension {batch_dim})"
    length = real = None
    mask_pos, kind = None, ""
    if padding is not None:
        for j, i in enumerate(batched):
            if names[i] == padding:
                r = rows[j]
                if r.dim() == 2:
                    mask_pos, kind, length = j, "mask", r.shape[1]
                    real = (r != 0).cpu()
                elif r.dim() == 1:
                    other = next((t for t in rows if t.dim() >= 2), None)
                    if other is not None:
                        mask_pos, kind, length = j, "lengths", other.shape[1]
                        real = torch.arange(length)[None, :] < r.detach().cpu()[:, None]
                break
    if real is None and pad_value is not None:
        for j, r in enumerate(rows):
            if r.dim() >= 2:
                mask_pos, kind, length = j, "pad_value", r.shape[1]
                real = (r != pad_value).reshape(size, length, -1).any(-1).cpu()
                break
    starts: list[int] = []
    counts: list[int] = []
    token_arg = [False] * len(rows)
    if real is not None:
        assert length is not None
        token_arg = [r.dim() >= 2 and r.shape[1] == length for r in rows]
        has = real.any(1)
        ri = real.to(torch.int8)
        first = ri.argmax(1)
        last = length - ri.flip(1).argmax(1)
        starts_t = torch.where(has, first, 0)
        counts_t = torch.where(has, last, length) - starts_t
        starts, counts = starts_t.tolist(), counts_t.tolist()
        sig.update(f"padded {kind} at {mask_pos}".encode())
    for r, tok in zip(rows, token_arg, strict=True):
        sig.update(f"T{r.dtype}{tuple(r.shape[2:]) if tok else tuple(r.shape[1:])}{tok}".encode())
    return _Batch(size, batch_dim, batched, rows, length, mask_pos, kind, pad_value, real, starts, counts,
                  token_arg, sig)


def signature(batch: _Batch) -> bytes:
    return bytes(batch.signature.digest())


def sample_keys(batch: _Batch, padded: bool, ids: list[bytes] | None) -> list[bytes]:
    """One key per sample. ``padded``: key real spans (else whole rows)."""
    prefix = batch.signature.copy()
    if padded:
        prefix.update(b"span")
    elif batch.length is not None:
        prefix.update(f"whole {batch.length}".encode())
    if ids is not None:
        keys = []
        for i, sid in enumerate(ids):
            h = prefix.copy()
            h.update(b"id")
            if padded:
                h.update(struct.pack("<qq", batch.starts[i], batch.counts[i]))
            h.update(sid)
            keys.append(h.digest())
        return keys
    views = []
    for r, tok in zip(batch.rows, batch.token_arg, strict=True):
        data = _as_bytes(r.detach().cpu())
        width = data.shape[1]
        views.append((data, _buffer(data), width, width // batch.length if (padded and tok and batch.length) else 0))
    keys = []
    for i in range(batch.size):
        h = prefix.copy()
        if padded:
            s, n = batch.starts[i], batch.counts[i]
            h.update(struct.pack("<qq", s, n))
        for _, mv, width, per_token in views:
            base = i * width
            if per_token:
                h.update(mv[base + s * per_token:base + (s + n) * per_token])
            else:
                h.update(mv[base:base + width])
        keys.append(h.digest())
    return keys


def id_bytes(ids: Any, size: int) -> list[bytes] | str:
    """The ``key=`` ids of a batch as bytes, one per sample, or why they cannot be read."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            return f"key ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}"
        values: list[Any] = ids.tolist()
    elif isinstance(ids, (list, tuple)):
        values = list(ids)
    else:
        try:
            values = list(ids)
        except TypeError:
            return f"key ids must be a tensor or a sequence, got {type(ids).__name__}"
    if len(values) != size:
        return f"key ids give {len(values)} ids for a batch of {size}"
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, str, bytes)):
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, (int, str, bytes)):
                return f"a key id must be an int, str or bytes, got {type(v).__name__}"
        out.append(f"{type(v).__name__}:{v!r}".encode())
    return out
