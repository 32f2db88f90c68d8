"""Freezer(cache=...): the frozen prefix's forward is skipped, and training is unchanged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerfreeze as lf
from layerfreeze.skip.proof import PROOF_ROWS


class Tally:
    """A counter held by a module (not a plain attribute: the module tree's digest ignores it)."""

    def __init__(self) -> None:
        self.n = 0


class Counted(nn.Linear):
    """A linear layer that counts the samples it computes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tally = Tally()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tally.n += x.shape[0]
        return super().forward(x)


def stack(width: int = 8, depth: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = [Counted(5, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [Counted(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers)


def groups(depth: int = 4) -> list[str]:
    return [f"[{2 * i}]" for i in range(depth)]


def counts(net: nn.Module) -> list[int]:
    return [m.tally.n for m in net.modules() if isinstance(m, Counted)]


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x), size)]


def train_pair(net, schedule, data, epochs, *, cache=True, loss=None, lr=0.05, each_epoch=None):
    """Train ``net`` and a copy side by side, the copy with ``cache``: the loss of
    every step and the grads of the trainable parameters must agree."""
    ref = copy.deepcopy(net)
    loss = loss or (lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]))
    opt_a = torch.optim.SGD(ref.parameters(), lr=lr)
    opt_b = torch.optim.SGD(net.parameters(), lr=lr)
    fa = lf.Freezer(ref, opt_a, copy.deepcopy(schedule))
    fb = lf.Freezer(net, opt_b, schedule, cache=cache)
    losses = []
    for epoch in range(epochs):
        fa.set_epoch(epoch)
        fb.set_epoch(epoch)
        for batch in data(epoch):
            out = []
            for model, opt in ((ref, opt_a), (net, opt_b)):
                opt.zero_grad()
                value = loss(model, batch)
                value.backward()
                out.append(value.detach())
            torch.testing.assert_close(out[1], out[0], atol=1e-4, rtol=0)
            for (name, pa), pb in zip(ref.named_parameters(), net.parameters(), strict=True):
                assert pa.requires_grad == pb.requires_grad, name
                if pa.grad is not None:
                    torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=name)
            opt_a.step()
            opt_b.step()
            losses.append(out[1].item())
        if each_epoch is not None:
            each_epoch(epoch, fb)
    return fb, losses


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)


def test_sequential_agrees_at_every_boundary_and_skips(xy):
    torch.manual_seed(0)
    net = stack()
    x, y = xy
    sched = lf.Schedule().progressive_freeze(groups(), start=0.2, end=0.8, total_epochs=5, mode="eval")
    seen = []

    def each(epoch, fz):
        seen.append((fz.skip_stats().groups, fz.skip_stats().skipping))

    fz, _ = train_pair(net, sched, lambda e: batches(x, y, 8, e), 6, each_epoch=each)
    assert seen == [(0, False), (1, True), (2, True), (3, True), (4, True), (4, True)]
    # the last epochs: the whole stack frozen, nothing of it runs
    before = counts(net)
    fz.set_epoch(6)
    for bx, _ in batches(x, y, 8, 6):
        net(bx)
    assert counts(net) == before
    st = fz.skip_stats()
    assert st.hits > 0 and st.bytes_held > 0 and st.entries == 24 and st.reason is None


def test_the_order_is_learnt_without_an_extra_forward_while_nothing_is_frozen(xy):
    torch.manual_seed(0)
    net = stack()
    x, y = xy
    sched = lf.Schedule().freeze("[0]", from_epoch=1, mode="eval")
    fz = lf.Freezer(net, torch.optim.SGD(net.parameters(), lr=0.05), sched, cache=True)
    fz.set_epoch(0)
    net(x[:8])
    assert counts(net)[0] == 8  # the training forward only
    assert not fz.skip_stats().skipping
    fz.set_epoch(1)
    for bx, _ in batches(x, y, 8, 1):
        net(bx)
    st = fz.skip_stats()
    assert st.skipping and st.module == "0" and st.entries == len(x)
    before = counts(net)
    for bx, _ in batches(x, y, 8, 2):
        net(bx)
    assert counts(net)[0] == before[0]


def test_boundary_up_runs_only_the_new_group_once_per_sample(xy):
    torch.manual_seed(0)
    net = stack()
    x, y = xy
    sched = lf.Schedule().freeze("[0]", mode="eval").freeze("[2]", from_epoch=2, mode="eval")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    fz = lf.Freezer(net, opt, sched, cache=True)
    for epoch in range(2):
        fz.set_epoch(epoch)
        for bx, _ in batches(x, y, 8, epoch):
            net(bx)
    assert fz.skip_stats().module == "0"
    fz.set_epoch(2)
    before = counts(net)
    for bx, _ in batches(x, y, 8, 2):
        net(bx)
    grew = [a - b for a, b in zip(counts(net), before, strict=True)]
    assert fz.skip_stats().module == "2"
    # group [0]: only the proof's full forward of the first rows of one batch;
    # group [2]: each of the 24 samples once from its stored input, plus those
    # rows in the proof and the samples the first check computes again (up to
    # two of the proof's rows, one fewer than it has)
    assert grew[0] == PROOF_ROWS
    assert grew[1] == 24 + PROOF_ROWS + min(2, PROOF_ROWS - 1)
    # the level below was dropped once every sample was stored above it
    assert list(fz.skip._levels) == ["2"]
    before = counts(net)
    for bx, _ in batches(x, y, 8, 3):
        net(bx)
    grew = [a - b for a, b in zip(counts(net), before, strict=True)]
    assert grew[:2] == [0, 0]


def test_a_boundary_move_checks_the_weights_once_and_reads_each_weight_once(xy, monkeypatch):
    """The proof's samples come again in the same batch: no second deep check for them;
    the new level's first fingerprint reuses what the level below read in the same forward
    (large weights; small ones are summed together, in two kernels, at each read)."""
    from layerfreeze.feature_cache import call, validity

    torch.manual_seed(0)
    net = stack(width=128)  # 128 x 128 weights: large enough to be read on their own
    x, y = xy
    sched = lf.Schedule().progressive_freeze(groups(), start=0.0, end=0.5, total_epochs=4, mode="eval")
    fz = lf.Freezer(net, torch.optim.SGD(net.parameters(), lr=0.05), sched, cache=True)
    for epoch in range(2):
        fz.set_epoch(epoch)
        for bx, _ in batches(x, y, 8, epoch):
            net(bx)
    assert fz.skip_stats().groups == 2
    checks: list[int] = []
    reads: list[int] = []
    verify, large = call._FeatureCache.verify, validity._large
    monkeypatch.setattr(call._FeatureCache, "verify", lambda self: checks.append(1) or verify(self))
    monkeypatch.setattr(validity, "_large", lambda w: reads.append(w.data_ptr()) or large(w))
    fz.set_epoch(2)  # the boundary moves up one group
    net(batches(x, y, 8, 2)[0][0])
    assert fz.skip_stats().groups == 4
    # the level below: due once (its samples were seen last epoch); the new level: not yet
    assert len(checks) == 1
    big = [p for p in net[:7].parameters() if p.numel() > 2 * validity._SMALL]
    assert len(big) == 3 and len(reads) == len(set(reads)) == len(big)


def test_a_batch_mixing_levels_runs_the_new_group_only_for_stored_samples(xy):
    torch.manual_seed(0)
    net = stack()
    ref = copy.deepcopy(net)
    x, _ = xy
    sched = lf.Schedule().freeze("[0]", mode="eval").freeze("[2]", from_epoch=1, mode="eval")
    fz = lf.Freezer(net, schedule=sched, cache=True)
    fz.set_epoch(0)
    net(x[:12])
    fz.set_epoch(1)
    net(x[:4])  # proves the new boundary
    before = counts(net)
    mixed = torch.cat([x[4:12], x[12:20]])  # 8 samples stored below the boundary, 8 never seen
    torch.testing.assert_close(net(mixed), ref(mixed), atol=1e-6, rtol=1e-5)
    grew = [a - b for a, b in zip(counts(net), before, strict=True)]
    assert grew[:3] == [8, 16, 16]  # the first group only for the unseen samples; the layers above for all
    assert fz.skip_stats().module == "2"


def test_boundary_down_recomputes_and_agrees(xy):
    torch.manual_seed(0)
    net = stack()
    x, y = xy
    sched = lf.Schedule().gradual_unfreeze(groups(), start_epoch=1, mode="eval")
    seen = []
    ran = []

    def each(epoch, fz):
        seen.append((fz.skip_stats().module, list(fz.skip._levels)))
        ran.append(counts(net)[0])

    train_pair(net, sched, lambda e: batches(x, y, 8, e), 4, each_epoch=each)
    # each epoch one group less is frozen: what was stored above the new boundary is gone
    assert seen == [("6", ["6"]), ("4", ["4"]), ("2", ["2"]), ("0", ["0"])]
    # and every sample's new boundary output was recomputed from the input (the first group ran for each)
    assert all(b - a >= 24 for a, b in zip(ran, ran[1:], strict=False))


def test_adaptive_freeze_drives_it(xy):
    torch.manual_seed(0)
    net = stack()
    x, y = xy
    sched = lf.Schedule().adaptive_freeze(groups(), check_every=3, percentile=90, min_trainable=1, mode="eval")
    seen = []
    fz, _ = train_pair(net, sched, lambda e: batches(x, y, 8, e), 4,
                       each_epoch=lambda e, f: seen.append(f.skip_stats().groups))
    assert max(seen) >= 1 and fz.skip_stats().hits > 0


class AroundBoundary(nn.Module):
    """The head reads the embedding's output past every block."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        return self.head(torch.cat([self.blocks(e), e], -1))


def test_connection_around_the_boundary_is_refused_once_and_trains(xy):
    torch.manual_seed(0)
    net = AroundBoundary()
    x, y = xy
    sched = lf.Schedule().progressive_freeze(["emb", "blocks.0", "blocks.1"], start=0.0, end=0.5,
                                             total_epochs=4, mode="eval")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fz, _ = train_pair(net, sched, lambda e: batches(x, y, 8, e), 4)
    named = [str(w.message) for w in got if "around" in str(w.message)]
    assert len(named) == 1 and "output of emb" in named[0], [str(w.message) for w in got]
    st = fz.skip_stats()
    assert not st.skipping and "emb" in st.reason and st.module == "blocks.1"


def test_norm_mode_with_dropout_is_not_skipped_and_says_why(xy):
    net = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.2), nn.Linear(8, 8), nn.Linear(8, 3))
    x, _ = xy
    fz = lf.Freezer(net, schedule=lf.Schedule().freeze(["[0]", "[2]"], mode="norm"), cache=True)
    fz.set_epoch(0)
    net.train()
    with pytest.warns(UserWarning, match=r"1 \(Dropout\) is in training mode.*mode='eval'"):
        net(x)
    st = fz.skip_stats()
    assert not st.skipping and "mode='eval'" in st.reason and st.hits == 0


def test_a_hook_on_a_prefix_module_is_not_skipped_and_says_why(xy):
    net = stack()
    x, _ = xy
    seen = []
    net[2].register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    fz = lf.Freezer(net, schedule=lf.Schedule().freeze(groups()[:2], mode="eval"), cache=True)
    fz.set_epoch(0)
    with pytest.warns(UserWarning, match="2 has hooks"):
        net(x)
    net(x)
    assert seen == [len(x)] * 3  # the hook ran on every forward (and the first one's order-learning pass)
    st = fz.skip_stats()
    assert not st.skipping and "remove them" in st.reason


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_skipping_model_saved_whole_loads_as_a_plain_model(xy, how):
    from tests.conftest import roundtrip

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, _ = xy
    sched = lf.Schedule().freeze(["[0]", "[2]"], mode="eval")
    fz = lf.Freezer(net, schedule=sched, cache=True)
    fz.set_epoch(0)
    net(x)
    net(x)
    assert fz.skip_stats().skipping
    twin = roundtrip(net, how)
    ran = []
    twin[0].register_forward_hook(lambda m, a, out: ran.append(out.shape[0]))
    torch.testing.assert_close(twin(x), net(x), atol=1e-6, rtol=1e-5)
    assert ran == [len(x)]  # the copy runs its whole forward, once
    hits = fz.skip_stats().hits
    net(x)
    assert fz.skip_stats().hits == hits + len(x)  # the original still skips
    ran.clear()
    twin[0]._forward_hooks.clear()
    fz2 = lf.Freezer(twin, schedule=copy.deepcopy(sched), cache=True)  # a Freezer of its own skips on the copy
    fz2.set_epoch(0)
    twin(x)
    twin(x)
    assert fz2.skip_stats().skipping and fz2.skip_stats().hits >= len(x)


def test_threads_forwarding_one_skipping_model_each_get_their_own_outputs():
    from tests.conftest import run_threads

    torch.manual_seed(0)
    net = stack(width=16)
    x = torch.randn(64, 5)
    ref = copy.deepcopy(net)
    fz = lf.Freezer(net, schedule=lf.Schedule().freeze(groups()[:3], mode="eval"), cache=True)
    fz.set_epoch(0)
    with torch.no_grad():
        net(x)
        net(x)
        assert fz.skip_stats().skipping
        parts = list(x.split(4))
        expected = [ref(b) for b in parts]
    wrong: list[int] = []

    def work(k: int) -> None:
        with torch.no_grad():
            for r in range(40):
                i = (k * 5 + r) % len(parts)
                if not torch.allclose(net(parts[i]), expected[i], atol=1e-5, rtol=1e-4):
                    wrong.append(i)

    run_threads(work, switch=1e-6)  # switch threads as often as possible
    assert not wrong, f"{len(wrong)} of 160 forwards got another batch's rows"
    assert fz.skip_stats().skipping


def test_the_order_is_learnt_from_one_thread_when_several_start_at_once():
    from tests.conftest import run_threads

    torch.manual_seed(0)
    net = stack(width=16)
    x = torch.randn(32, 5)
    ref = copy.deepcopy(net)
    fz = lf.Freezer(net, schedule=lf.Schedule().freeze(groups()[:3], from_epoch=1, mode="eval"), cache=True)
    fz.set_epoch(0)  # nothing frozen: the first forward is learnt as it runs

    def work(k: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                net(x[k * 8:(k + 1) * 8])

    run_threads(work)
    fz.set_epoch(1)
    with torch.no_grad():
        net(x)
        before = counts(net)
        out = net(x.flip(0))
    assert fz.skip_stats().skipping and fz.skip_stats().module == "4"
    assert counts(net)[:3] == before[:3]
    torch.testing.assert_close(out, ref(x.flip(0)), atol=1e-5, rtol=1e-4)


def test_a_copy_made_before_the_first_forward_runs_plainly(xy):
    net = stack()
    x, _ = xy
    fz = lf.Freezer(net, schedule=lf.Schedule().freeze(groups()[:2], mode="eval"), cache=True)
    fz.set_epoch(0)
    twin = copy.deepcopy(net)
    torch.testing.assert_close(twin(x), net(x))
    assert fz.skip_stats().skipping


def test_weight_edit_below_the_boundary_is_never_served_stale(xy):
    torch.manual_seed(0)
    net = stack()
    x, _ = xy
    fz = lf.Freezer(net, schedule=lf.Schedule().freeze(groups()[:3], mode="eval"), cache=True, guard=False)
    fz.set_epoch(0)
    net(x)
    net(x)
    assert fz.skip_stats().hits > 0
    fresh = stack()

    def check():
        fresh.load_state_dict(net.state_dict())
        torch.testing.assert_close(net(x), fresh(x), atol=1e-6, rtol=1e-5)

    with torch.no_grad():
        net[0].weight.data.copy_(torch.randn_like(net[0].weight))
    check()
    state = {k: v + 0.5 for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    check()
    net[2].weight.data.mul_(2.0)
    fz.refresh()
    check()


def test_bad_cache_values_are_refused_and_change_nothing():
    net = stack()
    sched = lf.Schedule().freeze("[0]", mode="eval")
    with pytest.raises(lf.ArgumentError, match=r"cache='disk' needs a directory.*'path'"):
        lf.Freezer(net, schedule=sched, cache="disk")
    with pytest.raises(lf.ArgumentError, match=r"unknown key\(s\) \['stor'\]"):
        lf.Freezer(net, schedule=sched, cache={"stor": "memory"})
    with pytest.raises(lf.ArgumentError, match="store='cloud'"):
        lf.Freezer(net, schedule=sched, cache="cloud")
    with pytest.raises(lf.ArgumentTypeError, match="cache must be"):
        lf.Freezer(net, schedule=sched, cache=3)
    with pytest.raises(lf.ArgumentError, match="no schedule"):
        lf.Freezer(net, cache=True)
    assert all(p.requires_grad for p in net.parameters())
    assert not any(m._forward_pre_hooks or "forward" in m.__dict__ for m in net.modules())
    with pytest.raises(lf.ArgumentError, match="cache=True"):
        lf.Freezer(net, schedule=sched).skip_stats()


def test_close_removes_everything(xy):
    net = stack()
    x, _ = xy
    fz = lf.Freezer(net, schedule=lf.Schedule().freeze(groups()[:2], mode="eval"), cache=True)
    fz.set_epoch(0)
    net(x)
    assert fz.skip_stats().skipping
    fz.close()
    assert not any(m._forward_pre_hooks or m._forward_hooks or "forward" in m.__dict__ for m in net.modules())
    before = counts(net)
    net(x)
    assert counts(net)[0] == before[0] + len(x)


def test_dropping_the_freezer_detaches(xy):
    import gc

    net = stack()
    x, _ = xy
    fz = lf.Freezer(net, schedule=lf.Schedule().freeze(groups()[:2], mode="eval"), cache=True)
    fz.set_epoch(0)
    net(x)
    del fz
    gc.collect()
    before = counts(net)
    net(x)
    assert counts(net)[0] == before[0] + len(x)


def test_key_ids_hit_and_never_reach_the_model(xy):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = stack()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    net = Net()
    x, _ = xy
    fz = lf.Freezer(net, schedule=lf.Schedule().freeze(["body.0", "body.2"], mode="eval"),
                    cache={"key": "ids"})
    fz.set_epoch(0)
    ids = torch.arange(len(x))
    out = net(x, ids=ids)
    before = counts(net.body)
    again = net(x.flip(0), ids=ids.flip(0))
    assert counts(net.body)[:2] == before[:2]
    torch.testing.assert_close(again, out.flip(0))
    # hits: the proof's rows found again by the first forward, then every sample
    assert fz.skip_stats().hits == PROOF_ROWS + len(x)


class Body(nn.Module):
    """A container with code of its own around its layers (as a BertModel has masks and a loop)."""

    def __init__(self, depth: int = 3, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Counted(5 if i == 0 else 8, 8) for i in range(depth)])
        self.glue = Tally()
        self._outside = [extra] if extra is not None else []  # called, but not in this module's tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.glue.n += 1
        for layer in self.layers:
            x = torch.tanh(layer(x))
        for m in self._outside:
            x = m(x)
        return x * 0.5


class WithBody(nn.Module):
    def __init__(self, extra: bool = False, spare: bool = False) -> None:
        super().__init__()
        self.norm = nn.Identity()
        self.body = Body(extra=self.norm if extra else None)
        if spare:  # a parameter of the body that no group holds (a pooler the forward does not use)
            self.body.spare = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_container_frozen_through_is_stored_whole_and_its_own_code_is_skipped(xy):
    torch.manual_seed(0)
    net = WithBody()
    x, y = xy
    sched = lf.Schedule().progressive_freeze("body.layers", start=0.25, end=0.75, total_epochs=4, mode="eval")
    seen = []
    fz, _ = train_pair(net, sched, lambda e: batches(x, y, 8, e), 5,
                       each_epoch=lambda e, f: seen.append(f.skip_stats().module))
    # while the top layer trains, the group's own module; then the whole body
    assert seen == [None, "body.layers.0", "body.layers.1", "body", "body"]
    st = fz.skip_stats()
    assert st.boundary == "body.layers.2" and st.groups == 3 and st.skipping
    glue = net.body.glue.n
    for bx, _ in batches(x, y, 8, 9):
        net(bx)
    assert net.body.glue.n == glue  # the container's own forward did not run


@pytest.mark.parametrize("why", ["a trainable parameter", "a call outside its tree"])
def test_a_container_is_not_climbed_when_it_holds_more_than_the_prefix(xy, why):
    torch.manual_seed(0)
    net = WithBody(extra=why == "a call outside its tree", spare=why == "a trainable parameter")
    x, y = xy
    sched = lf.Schedule().freeze([f"body.layers.{i}" for i in range(3)], mode="eval")
    fz, _ = train_pair(net, sched, lambda e: batches(x, y, 8, e), 2)
    st = fz.skip_stats()
    assert st.skipping and st.module == "body.layers.2" and st.hits > 0


def test_a_refused_container_falls_back_to_the_groups_own_boundary(xy, monkeypatch):
    from layerfreeze.skip import proof

    real = proof._differ

    def differ(full, skipped, plan, *rest):
        return "forced for the test" if plan.serve.b == "body" else real(full, skipped, plan, *rest)

    monkeypatch.setattr(proof, "_differ", differ)
    torch.manual_seed(0)
    net = WithBody()
    x, y = xy
    sched = lf.Schedule().freeze([f"body.layers.{i}" for i in range(3)], mode="eval")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fz, _ = train_pair(net, sched, lambda e: batches(x, y, 8, e), 2)
    assert any("not skipping up to body:" in str(w.message) for w in caught), [str(w.message) for w in caught]
    st = fz.skip_stats()
    assert st.skipping and st.module == "body.layers.2" and st.hits > 0


def test_a_refusal_whose_outputs_differ_says_why_once(xy, monkeypatch):
    # a refusal named no reader: its warning was swallowed (its key was marked as warned first)
    from layerfreeze.skip import proof

    monkeypatch.setattr(proof, "_differ", lambda *a: "forced for the test")
    torch.manual_seed(0)
    net = stack()
    x, y = xy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fz, _ = train_pair(net, lf.Schedule().freeze(groups(2), mode="eval"), lambda e: batches(x, y, 8, e), 2)
    said = [str(w.message) for w in caught if "not skipping up to" in str(w.message)]
    assert len(said) == 1 and "forced for the test" in said[0]
    assert not fz.skip_stats().skipping and "forced for the test" in fz.skip_stats().reason


def _reads_training(forward):
    """A decorator like transformers' (it reads ``self.training`` for gradient checkpointing)."""
    import functools

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if getattr(self, "gradient_checkpointing", False) and self.training:
            raise AssertionError("not used here")
        return forward(self, *args, **kwargs)

    return wrapper


class DecoratedBody(Body):
    @_reads_training
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class ModalBody(Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (0.9 if self.training else 1.0)


@pytest.mark.parametrize("body, climbed", [(DecoratedBody, True), (ModalBody, False)])
def test_a_container_in_training_mode_is_climbed_unless_its_own_forward_reads_the_mode(xy, body, climbed):
    torch.manual_seed(0)
    net = WithBody()
    net.body = body()
    x, y = xy
    sched = lf.Schedule().freeze([f"body.layers.{i}" for i in range(3)], mode="eval")
    fz, _ = train_pair(net, sched, lambda e: batches(x, y, 8, e), 2)  # train_pair's model is in training mode
    st = fz.skip_stats()
    assert net.body.training and st.skipping and st.hits > 0
    assert st.module == ("body" if climbed else "body.layers.2")
