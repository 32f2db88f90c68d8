"""Skipping with a disk store: a restarted run reuses the stored boundary outputs;
and a property: for any stack and boundary, the skipped forward is the full one."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import sibling
from torch import nn

import layerfreeze as lf

_t = sibling("test_skip")
stack, groups, counts, batches = _t.stack, _t.groups, _t.counts, _t.batches


def _run(path: Path, state: dict | None, epochs: range):
    torch.manual_seed(len(epochs))  # another initialisation than the saved run's
    net = stack()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sched = lf.Schedule().freeze(groups()[:2], mode="eval")
    fz = lf.Freezer(net, opt, sched, cache={"store": "disk", "path": str(path)})
    if state is not None:
        net.load_state_dict(state["model"])
        fz.load_state_dict(state["freezer"])
        opt.load_state_dict(state["optimizer"])
    return net, opt, fz


def test_a_restarted_run_hits_from_the_first_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    net, opt, fz = _run(tmp_path / "store", None, range(2))
    for epoch in range(2):
        fz.set_epoch(epoch)
        for bx, by in batches(x, y, 8, epoch):
            opt.zero_grad()
            F.cross_entropy(net(bx), by).backward()
            opt.step()
    assert fz.skip_stats().entries == 24
    torch.save({"model": net.state_dict(), "freezer": fz.state_dict(), "optimizer": opt.state_dict()},
               tmp_path / "ckpt.pt")
    fz.close()
    del net, opt, fz

    state = torch.load(tmp_path / "ckpt.pt")
    net, opt, fz = _run(tmp_path / "store", state, range(3))
    fz.set_epoch(2)
    data = batches(x, y, 8, 2)
    first = net(data[0][0])
    st0 = fz.skip_stats()
    assert st0.skipping and st0.misses == 0 and st0.hits >= 8
    # the first batch ran the prefix only to learn the order and prove the boundary;
    # the rest of the epoch never runs it
    before = counts(net)
    for bx, _ in data[1:]:
        net(bx)
    assert counts(net)[:2] == before[:2]
    assert fz.skip_stats().misses == 0
    fresh = stack()
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(first, fresh(data[0][0]), atol=1e-6, rtol=1e-5)


_ACTS = [nn.Tanh, nn.ReLU, nn.GELU, nn.Identity, nn.Sigmoid]


@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(2, 6), min_size=2, max_size=5),
    acts=st.lists(st.integers(0, len(_ACTS) - 1), min_size=5, max_size=5),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_skipped_forward_is_the_full_forward(widths, acts, data, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 3
    for i, w in enumerate(widths):
        layers += [nn.Linear(width, w), _ACTS[acts[i]]()]
        width = w
    net = nn.Sequential(*layers, nn.Linear(width, 2))
    ref = copy.deepcopy(net)
    k = data.draw(st.integers(1, len(widths)), label="groups frozen")
    names = [f"[{2 * i}]" for i in range(len(widths))]
    fz = lf.Freezer(net, schedule=lf.Schedule().freeze(names[:k], mode="eval"), cache=True)
    fz.set_epoch(0)
    n = data.draw(st.integers(2, 9), label="samples")
    x = torch.randn(n, 3)
    for _ in range(3):
        take = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n), label="batch"))
        torch.testing.assert_close(net(x[take]), ref(x[take]), atol=1e-5, rtol=1e-4)
    s = fz.skip_stats()
    assert s.skipping and s.module == str(2 * (k - 1))


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.register_buffer("scale", torch.ones(5))  # frozen, read before the prefix
        self.gain = 1.0

    def forward(self, x):
        return self.head(self.backbone(x * self.scale * self.gain))


def _climbing(path: Path, state: dict | None = None, climb: bool = True):
    net = _Backbone()
    if state is not None:
        net.load_state_dict(state)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sched = lf.Schedule().progressive_freeze(["backbone.0", "backbone.2"], start=0.25, end=0.5, total_epochs=4,
                                             mode="eval") if climb else lf.Schedule().freeze("backbone", mode="eval")
    return net, opt, lf.Freezer(net, opt, sched, cache={"store": "disk", "path": str(path)})


def _train(net, opt, fz, epochs, x, y):
    for epoch in epochs:
        fz.set_epoch(epoch)
        for bx, by in batches(x, y, 8, epoch):
            opt.zero_grad()
            F.cross_entropy(net(bx), by).backward()
            opt.step()


def test_a_restarted_run_hits_after_the_boundary_climbed(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(0)
    net, opt, fz = _climbing(tmp_path / "store")
    _train(net, opt, fz, range(3), x, y)  # epoch 1: backbone.0; epoch 2: the whole backbone
    assert fz.skip_stats().module == "backbone"
    state = copy.deepcopy(net.state_dict())
    fz.close()
    net, opt, fz = _climbing(tmp_path / "store", state)  # a new model: none of the old one's leftovers
    fz.set_epoch(3)
    net(x[:8])
    stats = fz.skip_stats()
    assert stats.module == "backbone" and stats.misses == 0 and stats.hits >= 8


@pytest.mark.parametrize("change", ["buffer", "code"])
def test_a_restarted_run_with_another_input_scaling_does_not_reuse_the_store(tmp_path, change, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(0)
    net, opt, fz = _climbing(tmp_path / "store", climb=False)
    _train(net, opt, fz, range(3), x, y)
    state = copy.deepcopy(net.state_dict())
    fz.close()
    if change == "buffer":
        state["scale"].fill_(3.0)  # another checkpoint's buffer around the prefix
    else:  # the model's own forward changed between the runs
        monkeypatch.setattr(_Backbone, "forward", lambda self, x: self.head(self.backbone(x * self.scale * 3.0)))
    net, opt, fz = _climbing(tmp_path / "store", state, climb=False)
    fz.set_epoch(3)
    ref = _Backbone()
    ref.load_state_dict(state)
    fresh = torch.randn(8, 5, generator=g)  # the proof runs on samples the old store does not hold
    with torch.no_grad():
        for bx in [fresh, *(bx for bx, _ in batches(x, y, 8, 3))]:
            torch.testing.assert_close(net(bx), ref(bx), atol=1e-6, rtol=1e-5)
    stats = fz.skip_stats()
    assert stats.skipping and stats.hits > 0  # it skips, on outputs stored afresh


def _side_by_side(cached, plain, epochs, x, y):
    """Train two (model, optimizer, Freezer) triples on the same batches; the same loss at every step."""
    for epoch in epochs:
        for _, _, fz in (cached, plain):
            fz.set_epoch(epoch)
        for bx, by in batches(x, y, 8, epoch):
            losses = []
            for m, o, _ in (cached, plain):
                o.zero_grad()
                value = F.cross_entropy(m(bx), by)
                value.backward()
                o.step()
                losses.append(value.detach())
            torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)


def test_a_disk_store_that_cannot_be_written_trains_on_and_says_so(tmp_path, monkeypatch):
    import errno

    from layerfreeze.feature_cache.disk import _DiskStore

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_DiskStore, "put", full)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(0)
    net, opt, fz = _climbing(tmp_path / "store", climb=False)
    ref = copy.deepcopy(net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ref_fz = lf.Freezer(ref, ref_opt, lf.Schedule().freeze("backbone", mode="eval"))
    with pytest.warns(UserWarning, match="cannot be written") as caught:
        _side_by_side((net, opt, fz), (ref, ref_opt, ref_fz), range(2), x, y)
    assert sum("cannot be written" in str(w.message) for w in caught) == 1
    assert fz.skip_stats().entries == 0


@pytest.mark.parametrize("damage", ["index_is_a_directory", "rows_are_a_directory", "store_is_a_file"])
def test_a_damaged_disk_store_is_named_and_left_out(tmp_path, damage):
    """A restarted run over a store broken by hand trains as without ``cache=`` and says
    once that the store cannot be used (it used to blame the skipped forward)."""
    import shutil
    import warnings

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    net, opt, fz = _run(tmp_path / "store", None, range(2))
    fz.set_epoch(0)
    for bx, by in batches(x, y, 8, 0):
        opt.zero_grad()
        F.cross_entropy(net(bx), by).backward()
        opt.step()
    state = {"model": copy.deepcopy(net.state_dict()), "freezer": fz.state_dict(),
             "optimizer": copy.deepcopy(opt.state_dict())}
    fz.close()
    (d,) = (tmp_path / "store").iterdir()
    if damage == "index_is_a_directory":
        (d / "index").unlink()
        (d / "index").mkdir()
    elif damage == "rows_are_a_directory":
        rows = [*d.glob("*.smp"), *d.glob("*.tok")]
        assert rows
        for f in rows:
            f.unlink()
            f.mkdir()
    else:
        shutil.rmtree(d)
        d.write_text("not a directory")
    net, opt, fz = _run(tmp_path / "store", state, range(3))
    ref = stack()
    ref.load_state_dict(state["model"])
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ref_opt.load_state_dict(state["optimizer"])
    ref_fz = lf.Freezer(ref, ref_opt, lf.Schedule().freeze(groups()[:2], mode="eval"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _side_by_side((net, opt, fz), (ref, ref_opt, ref_fz), (1, 2), x, y)
    said = [str(w.message) for w in caught]
    assert sum("cannot be used" in m and str(tmp_path / "store") in m for m in said) == 1, said
    assert not any("differs" in m for m in said), said
