"""The memory store, and the byte helpers the stores and keys share.

Each output layout has one buffer per leaf: per-token leaves hold the real
tokens of every sample back to back (a sample is an offset and a token count),
per-sample leaves hold one row per sample. A warm batch is then one
``index_select`` per leaf: a per-token leaf's buffer ends with one row of
zeros, which the padded positions of a batch read (:meth:`_MemoryStore.padded`).
"""

from __future__ import annotations

import ctypes

import torch

from .layout import _Layout

_MIN_ROWS = 64


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` host tensor -> contiguous ``[n, row_bytes]`` uint8 tensor."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_complex():
        t = torch.view_as_real(t).contiguous()
    n = t.shape[0]
    return t.reshape(n, -1).view(torch.uint8).reshape(n, -1)


def _buffer(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (hashlib and file
    writes read it directly; the caller keeps ``t`` alive meanwhile)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _token_index(offsets: list[int], counts: list[int], device: torch.device) -> torch.Tensor:
    """Indices of ``counts[i]`` consecutive rows from ``offsets[i]``, all samples back to back."""
    n = torch.tensor(counts, dtype=torch.long)
    total = int(sum(counts))
    start = torch.tensor(offsets, dtype=torch.long) - (n.cumsum(0) - n)
    return (torch.arange(total) + torch.repeat_interleave(start, n, output_size=total)).to(device)


class _MemoryStore:
    """Features of each layout in growable buffers (capacity doubles as samples arrive).

    ``index`` maps a key to ``(layout id, sample slot, token offset, token count)``.
    Rows stay on the device they were computed on when that is a GPU and
    ``max_bytes`` is given (a device store), else in host memory (pinned when
    the module runs on a GPU).
    """

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.device: torch.device | None = None
        self.pin = False
        self.clear()

    def clear(self) -> None:
        self.index: dict[bytes, tuple[str, int, int, int]] = {}
        self.layouts: dict[str, _Layout] = {}
        self.bufs: dict[str, list[torch.Tensor]] = {}
        self.used: dict[str, list[int]] = {}  # [tokens, samples]
        self.nbytes = 0

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        assert self.device is not None
        # a normal tensor even when filled under torch.inference_mode(): a later fill outside it writes too
        with torch.inference_mode(False):
            return torch.empty(shape, dtype=dtype, device=self.device, pin_memory=self.pin)

    def _grow(self, lid: str, layout: _Layout, tokens: int, samples: int, dry: bool = False) -> bool:
        """Make room for ``tokens`` more token rows and ``samples`` more sample rows."""
        bufs = self.bufs.get(lid)
        used = self.used.get(lid, [0, 0])
        need = [used[0] + tokens, used[1] + samples]
        caps = [0, 0]
        if bufs is not None:
            for b, t in zip(bufs, layout.token, strict=True):
                caps[int(not t)] = b.shape[0] - int(t)  # a token buffer's last row is the zero row
        if need[0] <= caps[0] and need[1] <= caps[1]:
            return True
        tb, sb = sum(layout.token_bytes), sum(layout.sample_bytes)

        def extra(new: list[int]) -> int:
            zero_row = tb if bufs is None else 0
            return (new[0] - caps[0]) * tb + (new[1] - caps[1]) * sb + zero_row

        new = [max(need[k], 2 * caps[k], _MIN_ROWS) if need[k] > caps[k] else caps[k] for k in (0, 1)]
        if self.budget is not None and self.nbytes + extra(new) > self.budget:
            new = [max(need[k], caps[k]) for k in (0, 1)]
            if self.nbytes + extra(new) > self.budget:
                return False
        if dry:
            return True
        grown = []
        for j, (shape, dtype, t) in enumerate(zip(layout.shapes, layout.stored, layout.token, strict=True)):
            k = 0 if t else 1
            if bufs is not None and new[k] == caps[k]:
                grown.append(bufs[j])
                continue
            b = self._alloc((new[k] + int(t), *shape), dtype)
            if bufs is not None and used[k]:
                b[:used[k]].copy_(bufs[j][:used[k]])
            if t:
                b[-1].zero_()
            grown.append(b)
        self.nbytes += extra(new)
        self.bufs[lid] = grown
        self.used[lid] = used
        self.layouts[lid] = layout
        return True

    def put(self, lid: str, layout: _Layout, keys: list[bytes], rows: list[torch.Tensor], counts: list[int]) -> int:
        """Store samples: ``rows[j]`` holds leaf ``j``'s token rows of every sample
        back to back (``counts[i]`` for sample ``i``) or one row per sample.
        Stores the longest prefix the budget allows; returns how many."""
        if self.device is None:
            dev = rows[0].device
            self.device = dev if dev.type != "cpu" and self.budget is not None else torch.device("cpu")
            self.pin = dev.type == "cuda" and self.device.type == "cpu"
        n = len(keys)
        if not self._grow(lid, layout, sum(counts), n):
            lo, hi = 0, n  # the most samples that fit: lo fits, hi does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._grow(lid, layout, sum(counts[:mid]), mid, dry=True):
                    lo = mid
                else:
                    hi = mid
            n = lo
            if n <= 0 or not self._grow(lid, layout, sum(counts[:n]), n):
                return 0
        used = self.used[lid]
        ntok = sum(counts[:n])
        for buf, src, t in zip(self.bufs[lid], rows, layout.token, strict=True):
            k, m = (0, ntok) if t else (1, n)
            buf[used[k]:used[k] + m].copy_(src[:m])
        off = used[0]
        for i, key in enumerate(keys[:n]):
            self.index[key] = (lid, used[1] + i, off, counts[i])
            off += counts[i]
        used[0] += ntok
        used[1] += n
        return n

    def get(self, lid: str, slots: list[int], offsets: list[int], counts: list[int],
            device: torch.device) -> list[torch.Tensor]:
        """Per leaf: the token rows of the samples back to back, or their sample rows."""
        layout = self.layouts[lid]
        bufs = self.bufs[lid]
        assert self.device is not None
        sidx = torch.tensor(slots, dtype=torch.long, device=self.device)
        tidx = _token_index(offsets, counts, self.device) if any(layout.token) else sidx
        return [self._select(buf, tidx if t else sidx, dtype, device)
                for buf, t, dtype in zip(bufs, layout.token, layout.dtypes, strict=True)]

    def _select(self, buf: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows ``idx`` of a buffer, on ``device`` as ``dtype`` (through pinned memory to a GPU)."""
        if self.pin:
            dst = torch.empty((idx.shape[0], *buf.shape[1:]), dtype=buf.dtype, pin_memory=True)
            torch.index_select(buf, 0, idx, out=dst)
            got = dst.to(device, non_blocking=True)
        else:
            got = buf.index_select(0, idx).to(device)
        return got if got.dtype == dtype else got.to(dtype)

    def padded(self, lid: str, slots: list[int], offsets: list[int], counts: list[int], starts: list[int],
               length: int, device: torch.device) -> list[torch.Tensor]:
        """Per leaf: the samples' outputs as a padded batch (zeros outside each
        sample's real span ``starts[i] .. starts[i] + counts[i]``; ``[n, length, ...]``)
        for a per-token leaf, their sample rows otherwise. One ``index_select`` per leaf."""
        layout = self.layouts[lid]
        bufs = self.bufs[lid]
        assert self.device is not None
        sidx = torch.tensor(slots, dtype=torch.long, device=self.device)
        tidx = None
        if any(layout.token):
            zero = next(b for b, t in zip(bufs, layout.token, strict=True) if t).shape[0] - 1
            pos = torch.arange(length, device=self.device)
            start = torch.tensor(starts, dtype=torch.long, device=self.device)[:, None]
            count = torch.tensor(counts, dtype=torch.long, device=self.device)[:, None]
            base = torch.tensor(offsets, dtype=torch.long, device=self.device)[:, None] - start
            tidx = torch.where((pos >= start) & (pos < start + count), base + pos, zero).view(-1)
        out = []
        for buf, t, dtype in zip(bufs, layout.token, layout.dtypes, strict=True):
            idx = tidx if t else sidx
            assert idx is not None
            got = self._select(buf, idx, dtype, device)
            out.append(got.view(len(slots), length, *buf.shape[1:]) if t else got)
        return out
