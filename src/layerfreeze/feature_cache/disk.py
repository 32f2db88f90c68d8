"""The disk store: memory-mapped feature files that processes on one machine share.

One directory per weight version (named by a hash of the weights and the
module tree). Per output layout ``L``: ``L.json`` (its structure, written under
a temporary name and renamed into place), ``L.tok`` (token rows, fixed width)
and ``L.smp`` (sample rows, fixed width). ``index`` holds one fixed-size record
per sample: key, layout, where its rows are, a CRC32 of its bytes and a CRC32
of the record itself.

Crash safety: rows are written before the records that point at them, and a
writer holding the directory's lock first cuts every file back to what the
records commit to, so a killed writer leaves rows nobody points at (cut by
the next writer) or a torn last record (ignored: too short or a bad CRC), never
a record pointing at rows that are not there. Integrity: each record's CRC is
checked when it is read and each sample's bytes the first time this process
serves them; a mismatch is a miss, and the sample is written again. A layout
file that cannot be read is rewritten by the next write of that layout (its
name is a hash of its content), and the records that point at it count again,
so a damaged store heals instead of computing everything from then on.

Sharing: writers take an exclusive ``fcntl`` lock on ``lock`` (where fcntl
exists), re-read the index, and skip samples another process has already
written; a reader that misses a key re-reads the index's new records, so a
sample written by one process is a hit for the others. Files are mapped
read-only-private (``MAP_PRIVATE``), so their pages live once in the page cache
of the machine, not once per process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator

import torch

from .layout import _Layout
from .stores import _as_bytes, _buffer, _token_index

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one process per path
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("layerfreeze")

_REC = struct.Struct("<16s16sQIQII")  # key, layout id, token start, token count, sample slot, data crc, record crc


class _DiskStore:
    def __init__(self, root: str, budget: int | None) -> None:
        self.root = root
        self.budget = budget
        self.dir: str | None = None
        self._reset()

    def _reset(self) -> None:
        self.index: dict[bytes, tuple[str, int, int, int]] = {}  # key -> layout, slot, token offset, tokens
        self.crc: dict[bytes, int] = {}
        self.checked: set[bytes] = set()
        self.damaged: set[tuple[bytes, str, int, int, int, int]] = set()  # records whose rows failed their CRC
        self.layouts: dict[str, _Layout] = {}
        self.bad_layouts: set[str] = set()
        self.ends: dict[str, list[int]] = {}  # committed [token rows, sample rows] per layout
        self.maps: dict[tuple[str, str], torch.Tensor] = {}
        self.nbytes = 0
        self._pos = 0

    def _path(self, name: str) -> str:
        assert self.dir is not None
        return os.path.join(self.dir, name)

    def open(self, digest: str) -> None:
        self.dir = os.path.join(self.root, digest)
        os.makedirs(self.dir, exist_ok=True)
        self._reset()
        self.reload()

    def close(self) -> None:
        self.maps = {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._path("lock"), "a+b") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _widths(layout: _Layout) -> tuple[int, int]:
        return sum(layout.token_bytes), sum(layout.sample_bytes)

    def _layout(self, lid: str, quiet: bool = False) -> _Layout | None:
        if lid in self.layouts:
            return self.layouts[lid]
        if lid in self.bad_layouts:
            return None
        try:
            with open(self._path(lid + ".json")) as f:
                layout = _Layout.from_json(json.load(f))
            if layout.ident() != lid:
                raise ValueError("its content does not match its name")
        except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError) as e:
            if not quiet:
                log.warning("layerfreeze cache: ignoring unreadable layout %s in %s (the next write of "
                            "this layout rewrites it): %s", lid, self.dir, e)
            self.bad_layouts.add(lid)
            return None
        self.layouts[lid] = layout
        self.ends.setdefault(lid, [0, 0])
        return layout

    def reload(self) -> None:
        """Read the index records written since the last read (by any process)."""
        try:
            size = os.path.getsize(self._path("index"))
        except OSError:
            return
        end = size - size % _REC.size
        if end <= self._pos:
            return
        with open(self._path("index"), "rb") as f:
            f.seek(self._pos)
            data = f.read(end - self._pos)
        self._pos += len(data) - len(data) % _REC.size
        bad = 0
        for off in range(0, len(data) - _REC.size + 1, _REC.size):
            rec = data[off:off + _REC.size]
            key, lid_b, tok, ntok, slot, crc, rcrc = _REC.unpack(rec)
            if zlib.crc32(rec[:-4]) != rcrc:
                bad += 1
                continue
            lid = lid_b.decode("ascii", "replace")
            if (key, lid, slot, tok, ntok, crc) in self.damaged:
                continue
            layout = self._layout(lid)
            if layout is None:
                continue
            if key not in self.index:
                tw, sw = self._widths(layout)
                self.nbytes += ntok * tw + sw
            self.index[key] = (lid, slot, tok, ntok)
            self.crc[key] = crc
            self.checked.discard(key)
            ends = self.ends[lid]
            ends[0] = max(ends[0], tok + ntok)
            ends[1] = max(ends[1], slot + 1)
        if bad:
            log.warning("layerfreeze cache: skipping %d damaged index record(s) in %s", bad, self.dir)

    def _map(self, lid: str, kind: str, width: int, rows: int) -> torch.Tensor | None:
        """A private read-only map of the first ``rows`` rows of ``L.<kind>``, or None if the file is shorter."""
        mm = self.maps.get((lid, kind))
        if mm is not None and mm.shape[0] >= rows:
            return mm
        path = self._path(f"{lid}.{kind}")
        try:
            have = os.path.getsize(path) // width
        except OSError:
            return None
        if have < rows:
            return None
        mm = torch.from_file(path, shared=False, size=have * width, dtype=torch.uint8).view(have, width)
        self.maps[(lid, kind)] = mm
        return mm

    def _bytes_of(self, key: bytes) -> list[torch.Tensor] | None:
        lid, slot, tok, ntok = self.index[key]
        layout = self.layouts[lid]
        tw, sw = self._widths(layout)
        parts = []
        if tw:
            mm = self._map(lid, "tok", tw, tok + ntok)
            if mm is None:
                return None
            parts.append(mm[tok:tok + ntok])
        if sw:
            mm = self._map(lid, "smp", sw, slot + 1)
            if mm is None:
                return None
            parts.append(mm[slot:slot + 1])
        return parts

    def lookup(self, keys: list[bytes]) -> list[tuple[str, int, int, int] | None]:
        """Each key's entry, or None; a missing key re-reads the index once, and a
        sample's bytes are checked against their CRC the first time they are served."""
        if any(k not in self.index for k in keys):
            self.reload()
        return [self.index.get(k) if self._intact(k) else None for k in keys]

    def _intact(self, key: bytes) -> bool:
        """Whether ``key`` is stored with the bytes its record's CRC names (checked once
        per process); a damaged sample is forgotten, so that it is computed and written again."""
        got = self.index.get(key)
        if got is None:
            return False
        if key in self.checked:
            return True
        parts = self._bytes_of(key)
        crc = 0
        for p in parts or ():
            crc = zlib.crc32(_buffer(p), crc)
        if parts is None or crc != self.crc[key]:
            log.warning("layerfreeze cache: a stored sample in %s is damaged or truncated; recomputing it", self.dir)
            self.damaged.add((key, *got, self.crc[key]))
            del self.index[key]
            return False
        self.checked.add(key)
        return True

    def put(self, lid: str, layout: _Layout, keys: list[bytes], rows: list[torch.Tensor], counts: list[int]) -> int:
        """Append samples (see :meth:`_MemoryStore.put` for ``rows``); returns how
        many of ``keys`` are now stored (written here or by another process)."""
        tw, sw = self._widths(layout)
        token_parts = [_as_bytes(r.detach().to("cpu", l_dtype)) for r, t, l_dtype in
                       zip(rows, layout.token, layout.stored, strict=True) if t]
        sample_parts = [_as_bytes(r.detach().to("cpu", l_dtype)) for r, t, l_dtype in
                        zip(rows, layout.token, layout.stored, strict=True) if not t]
        tok_bytes = torch.cat(token_parts, 1) if token_parts else None
        smp_bytes = torch.cat(sample_parts, 1) if sample_parts else None
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        with self._locked():
            self.reload()
            if lid not in self.layouts:
                # missing, or unreadable (damaged): the name is the content's hash, so
                # the right content is known and rows already written under it stay valid
                self.bad_layouts.discard(lid)
                if self._layout(lid, quiet=True) is None:
                    tmp = self._path(f".{lid}.json.{os.getpid()}.tmp")
                    with open(tmp, "w") as f:
                        json.dump(layout.to_json(), f)
                    os.replace(tmp, self._path(lid + ".json"))
                    self.bad_layouts.discard(lid)
                    if self._layout(lid) is None:
                        return 0
                    self._pos = 0  # records skipped while it was unreadable count again
                    self.reload()
            ends = self.ends[lid]
            todo = []
            total = self.nbytes
            for i, k in enumerate(keys):
                if self._intact(k):
                    continue
                size = counts[i] * tw + sw
                if self.budget is not None and total + size > self.budget:
                    break
                total += size
                todo.append(i)
            stored = sum(1 for k in keys if k in self.index)
            if not todo:
                return stored
            records = []
            tok_chunks, smp_chunks = [], []
            tok, slot = ends
            for i in todo:
                a, b = offsets[i], offsets[i + 1]
                crc = 0
                if tok_bytes is not None:
                    tok_chunks.append(tok_bytes[a:b])
                    crc = zlib.crc32(_buffer(tok_bytes[a:b].contiguous()), crc)
                if smp_bytes is not None:
                    smp_chunks.append(smp_bytes[i:i + 1])
                    crc = zlib.crc32(_buffer(smp_bytes[i:i + 1].contiguous()), crc)
                head = _REC.pack(keys[i], lid.encode("ascii"), tok, counts[i], slot, crc, 0)[:-4]
                records.append((keys[i], tok, counts[i], slot, crc, head + struct.pack("<I", zlib.crc32(head))))
                tok += counts[i]
                slot += 1
            for kind, width, chunks, start in (("tok", tw, tok_chunks, ends[0]), ("smp", sw, smp_chunks, ends[1])):
                if not width:
                    continue
                path = self._path(f"{lid}.{kind}")
                with open(path, "r+b" if os.path.exists(path) else "w+b") as f:
                    f.truncate(start * width)  # cut rows a killed writer left behind
                    f.seek(start * width)
                    data = torch.cat(chunks).contiguous()
                    f.write(_buffer(data))
            ipath = self._path("index")
            with open(ipath, "r+b" if os.path.exists(ipath) else "w+b") as f:
                size = os.fstat(f.fileno()).st_size
                f.truncate(size - size % _REC.size)  # a torn record a killed writer left
                f.seek(0, os.SEEK_END)
                f.write(b"".join(r[-1] for r in records))
            for key, t0, n, s, crc, _ in records:
                self.index[key] = (lid, s, t0, n)
                self.crc[key] = crc
                self.checked.add(key)
            ends[0], ends[1] = tok, slot
            self.nbytes = total
            self._pos = os.path.getsize(ipath) - os.path.getsize(ipath) % _REC.size
            return stored + len(todo)

    def get(self, lid: str, slots: list[int], offsets: list[int], counts: list[int],
            device: torch.device) -> list[torch.Tensor]:
        layout = self.layouts[lid]
        tw, sw = self._widths(layout)
        out: list[torch.Tensor] = []
        tok_rows = smp_rows = None
        if tw:
            mm = self._map(lid, "tok", tw, max(o + c for o, c in zip(offsets, counts, strict=True)))
            assert mm is not None
            tok_rows = mm.index_select(0, _token_index(offsets, counts, torch.device("cpu")))
        if sw:
            mm = self._map(lid, "smp", sw, max(slots) + 1)
            assert mm is not None
            smp_rows = mm.index_select(0, torch.tensor(slots, dtype=torch.long))
        cols = [0, 0]
        for t, shape, stored, dtype, nb in zip(layout.token, layout.shapes, layout.stored, layout.dtypes,
                                               [a + b for a, b in zip(layout.token_bytes, layout.sample_bytes,
                                                                      strict=True)], strict=True):
            src = tok_rows if t else smp_rows
            assert src is not None
            k = 0 if t else 1
            part = src[:, cols[k]:cols[k] + nb].contiguous()
            cols[k] += nb
            if stored == torch.bool:
                value = part.view(torch.uint8).to(torch.bool)
            else:
                value = part.view(stored)
            value = value.reshape(src.shape[0], *shape)
            out.append(value.to(device=device, dtype=dtype))
        return out
