"""The first check of a call signature: are a batch's rows independent along
the batch axis, and (when padded) do real tokens ignore the padding? It also
tells which outputs are per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import keys as _keys
from .layout import _flatten, _unflatten


@dataclass
class _Signature:
    """What the first check of one call signature found."""

    status: str  # "padded": real spans are keys; "whole": whole rows; "dependent": never cached
    token: tuple[bool, ...] | None  # per output tensor leaf: per token (padded only)
    reason: str = ""


def _tolerance(dtype: torch.dtype) -> float:
    return 3e-2 if dtype in (torch.float16, torch.bfloat16) or dtype.itemsize == 1 else 1e-4


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within the rounding another batch composition may cause (exact for integers)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return bool(torch.equal(a, b))
    if a.numel() == 0:
        return True
    tol = _tolerance(a.dtype)
    x, y = a.detach().to(torch.complex128 if a.is_complex() else torch.float64), b.detach().to(
        torch.complex128 if b.is_complex() else torch.float64)
    finite = torch.isfinite(x)
    scale = max(1.0, float(x[finite].abs().max())) if bool(finite.any()) else 1.0
    return bool(torch.allclose(x, y, rtol=tol, atol=tol * scale, equal_nan=True))


def _batch_first_false(module: nn.Module) -> list[str]:
    return [name or "(root)" for name, m in module.named_modules() if getattr(m, "batch_first", None) is False]


def _moved(out: Any, src: int, dst: int) -> Any:
    """``out`` with the batch axis of every tensor leaf moved from ``src`` to ``dst``."""
    if src == dst:
        return out
    leaves: list[Any] = []
    spec = _flatten(out, leaves)
    return _unflatten(spec, [x.movedim(src, dst) if isinstance(x, torch.Tensor) and x.dim() > max(src, dst) else x
                             for x in leaves])


class _FirstCheck:
    """The first check, as methods of the cache (which provides ``run``,
    ``module`` and ``batch_dim``)."""

    #: what to do when the batch is not on dimension 0 (a check's warning says it)
    _batch_dim_hint = "pass batch_dim=1 to lf.cache if dimension 1 is the batch"

    batch_dim: int

    @property
    def module(self) -> nn.Module:
        raise NotImplementedError

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _check(self, batch: _keys._Batch, leaves: list[Any], spec: Any, miss: list[int], computed: Any) -> _Signature:
        """Before anything of a call signature is stored: compute a few of the batch's
        samples on their own and compare with the batch. With padding, the probe
        also carries one more padded position: real positions must not move, and
        the output leaves whose dimension 1 grows are the per-token ones."""
        k = min(2, len(miss) - 1)
        rows = miss[:k]
        if batch.length is not None:
            token = self._padding_flags(batch, leaves, spec, rows, computed)
            if token is not None:
                return _Signature("padded", token)
        whole: list[Any] = []
        whole_spec = _flatten(_moved(computed, self.batch_dim, 0), whole)
        whole = [x[:k] if isinstance(x, torch.Tensor) else x for x in whole]
        got = self._probe(batch, leaves, spec, rows, extend=False)
        if self._compare(batch, whole_spec, whole, got, rows, padded=False) is not None:
            return _Signature("whole", None)
        hint = ""
        bff = _batch_first_false(self.module)
        if bff:
            hint = f"; submodules with batch_first=False: {', '.join(bff[:3])}: {self._batch_dim_hint}"
        reason = (f"rows of a batch along dimension {self.batch_dim} are not independent ({k} sample(s) computed "
                  f"on their own differ from the same samples computed in the batch){hint}")
        return _Signature("dependent", None, reason)

    def _padding_flags(self, batch: _keys._Batch, leaves: list[Any], spec: Any, rows: list[int],
                       computed: Any) -> tuple[bool, ...] | None:
        """Compute the first computed samples (``rows``, in the order computed) again
        with one more padded position: per-token flags of the output's tensor
        leaves if real positions did not move, else None."""
        whole: list[Any] = []
        whole_spec = _flatten(_moved(computed, self.batch_dim, 0), whole)
        whole = [x[:len(rows)] if isinstance(x, torch.Tensor) else x for x in whole]
        got = self._probe(batch, leaves, spec, rows, extend=True)
        return self._compare(batch, whole_spec, whole, got, rows, padded=True)

    def _probe(self, batch: _keys._Batch, leaves: list[Any], spec: Any, rows: list[int], extend: bool) -> Any:
        picked = list(leaves)
        idx = torch.tensor(rows)
        for j, (pos, r) in enumerate(zip(batch.batched, batch.rows, strict=True)):
            x = r.index_select(0, idx.to(r.device))
            if extend and batch.token_arg[j]:
                if j == batch.mask_pos and batch.mask_kind == "mask":
                    col = torch.zeros_like(x[:, :1])
                elif j == batch.mask_pos and batch.mask_kind == "pad_value":
                    col = torch.full_like(x[:, :1], batch.pad_value)
                else:
                    col = x[:, :1]  # a real value where padding goes: real positions must not see it
                x = torch.cat([x, col], 1)
            picked[pos] = x.movedim(0, batch.dim) if batch.dim else x
        args, kwargs = _unflatten(spec, picked)
        return _moved(self.run(tuple(args), dict(kwargs)), self.batch_dim, 0)

    def _compare(self, batch: _keys._Batch, whole_spec: Any, whole: list[Any], probe: Any, rows: list[int],
                 padded: bool) -> tuple[bool, ...] | None:
        """Per-token flags of the output's tensor leaves if the probe agrees with the batch, else None."""
        got: list[Any] = []
        if _flatten(probe, got) != whole_spec or len(got) != len(whole):
            return None
        token = []
        length = batch.length
        real = batch.real[rows] if batch.real is not None else None
        for a, b in zip(whole, got, strict=True):
            if not isinstance(a, torch.Tensor):
                if isinstance(b, torch.Tensor) or a != b:
                    return None
                continue
            if not isinstance(b, torch.Tensor):
                return None
            if a.shape == b.shape:
                if not _close(a, b):
                    return None
                token.append(False)
            elif (padded and length is not None and real is not None and a.dim() >= 2 and a.shape[1] == length
                  and b.shape[1] == length + 1 and a.shape[2:] == b.shape[2:] and a.shape[0] == b.shape[0]):
                m = real.to(a.device)
                if not _close(a[m], b[:, :length][m]):
                    return None
                token.append(True)
            else:
                return None
        return tuple(token)

