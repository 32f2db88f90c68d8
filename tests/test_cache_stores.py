"""The disk store: damaged or interrupted files are misses, never hits; processes
sharing one path are safe and share their work."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

import layerfreeze as lf
from layerfreeze.feature_cache import disk

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    lf.freeze(m, mode="eval")
    return m


def reference(x):
    with torch.no_grad():
        return net()(x)


def filled(path, x):
    cached = lf.cache(net(), store="disk", path=path)
    cached(x)
    (d,) = [p for p in path.iterdir() if p.is_dir()]
    (smp,) = list(d.glob("*.smp"))
    return d, smp


def reopened(path):
    return lf.cache(net(), store="disk", path=path)


def test_truncated_feature_file_is_a_miss(tmp_path):
    x = torch.randn(10, 6)
    _, smp = filled(tmp_path, x)
    os.truncate(smp, smp.stat().st_size - 5)  # the last sample loses bytes
    cached = reopened(tmp_path)
    torch.testing.assert_close(cached(x), reference(x))
    assert cached.stats().hits == 9 and cached.stats().misses == 1


def test_damaged_bytes_are_a_miss(tmp_path, caplog):
    x = torch.randn(10, 6)
    _, smp = filled(tmp_path, x)
    with open(smp, "r+b") as f:
        f.seek(4 * 12 + 2)  # inside sample 4
        b = f.read(1)
        f.seek(4 * 12 + 2)
        f.write(bytes([b[0] ^ 0x40]))
    cached = reopened(tmp_path)
    torch.testing.assert_close(cached(x), reference(x))
    assert cached.stats().hits == 9 and cached.stats().misses == 1
    assert "damaged or truncated" in caplog.text


def test_a_damaged_layout_file_is_rewritten_and_the_store_heals(tmp_path, caplog):
    # a damaged layout file made every later run compute and store nothing, for good
    x = torch.randn(10, 6)
    d, smp = filled(tmp_path, x)
    (layout,) = list(d.glob("*.json"))
    layout.write_bytes(bytes(b ^ 0x5A for b in layout.read_bytes()))
    with open(smp, "r+b") as f:  # and one sample's bytes
        f.seek(3 * 12 + 1)
        b = f.read(1)
        f.seek(3 * 12 + 1)
        f.write(bytes([b[0] ^ 0x40]))
    second = reopened(tmp_path)
    torch.testing.assert_close(second(x), reference(x))
    assert "unreadable layout" in caplog.text
    assert second.stats().misses == 10 and second.stats().entries == 10
    third = reopened(tmp_path)
    y = x[torch.randperm(10)]
    torch.testing.assert_close(third(y), reference(y))
    assert third.stats().hits == 10 and third.stats().misses == 0


def test_damaged_index_record_is_ignored(tmp_path):
    x = torch.randn(10, 6)
    d, _ = filled(tmp_path, x)
    with open(d / "index", "r+b") as f:
        f.seek(disk._REC.size * 2 + 20)  # inside record 2
        b = f.read(1)
        f.seek(disk._REC.size * 2 + 20)
        f.write(bytes([b[0] ^ 0x01]))
    cached = reopened(tmp_path)
    torch.testing.assert_close(cached(x), reference(x))
    assert cached.stats().hits == 9


def test_a_killed_writer_leaves_old_entries_readable_and_new_writes_aligned(tmp_path):
    x = torch.randn(10, 6)
    d, smp = filled(tmp_path, x)
    # what a writer killed mid-way leaves: rows without records, then a torn record
    with open(smp, "ab") as f:
        f.write(os.urandom(12 * 3 + 5))
    with open(d / "index", "ab") as f:
        f.write(os.urandom(disk._REC.size // 2))
    cached = reopened(tmp_path)
    torch.testing.assert_close(cached(x), reference(x))
    assert cached.stats().hits == 10
    y = torch.randn(7, 6, generator=torch.Generator().manual_seed(123))
    cached(y)  # appended after cutting the leftovers
    assert smp.stat().st_size == 17 * 12 and (d / "index").stat().st_size == 17 * disk._REC.size
    third = reopened(tmp_path)
    both = torch.cat([y, x])[torch.randperm(17)]
    torch.testing.assert_close(third(both), reference(both))
    assert third.stats().hits == 17


def test_records_are_checksummed(tmp_path):
    x = torch.randn(3, 6)
    d, _ = filled(tmp_path, x)
    data = (d / "index").read_bytes()
    assert len(data) == 3 * disk._REC.size
    rec = data[:disk._REC.size]
    import zlib

    assert struct.unpack("<I", rec[-4:])[0] == zlib.crc32(rec[:-4])


_CHILD = """
import json, os, sys, time, torch, layerfreeze as lf
from torch import nn
path, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
lf.freeze(net, mode="eval")
ref = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
ref.load_state_dict(net.state_dict())
net = lf.cache(net, store="disk", path=path)
x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))

def barrier(name):
    open(os.path.join(path, f"{name}.{rank}"), "w").close()
    deadline = time.time() + 60
    while not all(os.path.exists(os.path.join(path, f"{name}.{r}")) for r in range(world)):
        assert time.time() < deadline, "barrier timed out"
        time.sleep(0.01)

barrier("start")
for _ in range(3):  # both ranks write the overlap at the same time
    g = torch.Generator().manual_seed(rank + 10)
    for idx in torch.randperm(64, generator=g)[: 40].split(8):
        net(x[idx])
barrier("shard")
first = net.stats()
g = torch.Generator().manual_seed(99 + rank)
ok = True
for idx in torch.randperm(64, generator=g).split(16):
    out = net(x[idx])
    with torch.no_grad():
        ok = ok and torch.allclose(out, ref(x[idx]), rtol=1e-5, atol=1e-6)
s = net.stats()
print(json.dumps({"hits": s.hits - first.hits, "misses": s.misses - first.misses, "ok": bool(ok)}))
"""


def test_two_processes_share_one_path_and_write_each_sample_once(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), str(r), "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    (d,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = (d / "index").stat().st_size // disk._REC.size
    (smp,) = list(d.glob("*.smp"))
    # together the two shards covered these many distinct samples; each is on disk once
    covered = {int(i) for r in range(2) for i in torch.randperm(64, generator=torch.Generator().manual_seed(r + 10))[:40]}
    assert len(covered) < 64
    assert rows == 64 and smp.stat().st_size == 64 * 12  # written once, though both ranks computed some
    for r in results:
        assert r["ok"]
        # after the shard pass every sample either rank computed is a hit for both
        assert r["hits"] >= len(covered) and r["hits"] + r["misses"] == 64


def _repeated(padded):
    """A batch of 6 holding two samples twice (rows 3 and 5 repeat rows 0 and 1)."""
    g = torch.Generator().manual_seed(5)
    if padded:
        ids = torch.randint(1, 20, (6, 7), generator=g)
        for i, n in enumerate((7, 4, 5, 3, 6, 2)):
            ids[i, n:] = 0
    else:
        ids = torch.randn(6, 6, generator=g)
    ids[3], ids[5] = ids[0], ids[1]
    return ids


def _token_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(20, 8), nn.Tanh())
    lf.freeze(m, mode="eval")
    return m


@pytest.mark.parametrize("padded", [False, True], ids=["rows", "tokens"])
def test_a_sample_repeated_in_one_batch_is_written_once(tmp_path, padded):
    x = _repeated(padded)
    make = _token_net if padded else net
    opts = {"pad_value": 0} if padded else {}
    cached = lf.cache(make(), store="disk", path=tmp_path, **opts)
    first = cached(x)
    (d,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (d / "index").stat().st_size == 4 * disk._REC.size  # 4 distinct samples, not 6
    if padded:
        (tok,) = list(d.glob("*.tok"))
        assert tok.stat().st_size == (7 + 4 + 5 + 6) * 8 * 4  # the real tokens of the 4 distinct samples
    else:
        (smp,) = list(d.glob("*.smp"))
        assert smp.stat().st_size == 4 * 12
    again = reopened(tmp_path) if not padded else lf.cache(make(), store="disk", path=tmp_path, **opts)
    out = again(x)
    assert again.stats().hits == 6 and again.stats().misses == 0
    assert torch.equal(out[3], out[0]) and torch.equal(out[5], out[1])  # one stored entry serves both copies
    torch.testing.assert_close(out, first, rtol=1e-5, atol=1e-6)  # rows of one batch may round differently
    with torch.no_grad():
        fresh = make()(x)
    if padded:
        fresh = fresh * (x != 0)[..., None]  # padded positions hold 0
    torch.testing.assert_close(out, fresh, rtol=1e-5, atol=1e-6)


def test_a_sample_repeated_in_one_batch_is_held_once_in_memory():
    x = _repeated(False)
    cached = lf.cache(net())
    cached(x)
    store = cached.__dict__["_lf_cache"].memory
    assert [used[1] for used in store.used.values()] == [4]  # sample rows written: 4 distinct, not 6
    out = cached(x)
    assert cached.stats().hits == 6
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)
