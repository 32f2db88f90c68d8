"""Where features live: a chunked host-memory store and a memory-mapped disk store."""

from __future__ import annotations

import bisect
import ctypes
import json
import logging
import os

import torch

from .layout import _Layout

log = logging.getLogger("layerfreeze")

_CHUNK_BYTES = 256 << 20  # largest chunk of the memory store
_MERGE_BYTES = 4 << 30  # past this, a memory store's chunks are no longer merged

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


