"""The guard's fingerprint sees any single-element change, on every read path."""

from __future__ import annotations

import pytest
import torch

import layerfreeze as lf
from layerfreeze.guard import Guard, fingerprint


def _nudge(t: torch.Tensor, i: int) -> None:
    """Move element ``i`` of ``t`` (in place, layout kept) by the smallest step its dtype allows."""
    idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), t.shape))
    if t.is_floating_point():
        t[idx] = torch.nextafter(t[idx], torch.tensor(float("inf"), dtype=t.dtype))
    else:
        t[idx] += 1


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


CASES = {
    "float32 even (64-bit words)": lambda: _rand(6, 4),
    "float32 odd count": lambda: _rand(3, 3),
    "float32 misaligned view": lambda: _rand(9)[1:],
    "float32 non-contiguous": lambda: _rand(4, 6).t(),
    "float16": lambda: _rand(8).half(),
    "bfloat16 odd count": lambda: _rand(5).bfloat16(),
    "float64": lambda: _rand(5).double(),
    "int64 near overflow": lambda: torch.full((7,), 2**62, dtype=torch.int64),
    "uint8": lambda: torch.arange(16, dtype=torch.uint8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_any_single_element_change_changes_the_fingerprint(name):
    make = CASES[name]
    base = fingerprint(make())
    assert base.dtype == torch.int64 and base.shape == (2,)
    assert torch.equal(fingerprint(make()), base)  # equal values, equal fingerprint
    for i in range(make().numel()):
        t = make()
        _nudge(t, i)
        assert not torch.equal(fingerprint(t), base), f"element {i} of {name}"


def test_words_that_overflow_still_detect_a_change():
    # 64-bit words summing far past 2**63: the sum wraps, and a change still shows.
    words = torch.full((1001,), 2**62 + 12345, dtype=torch.int64)
    as_float = words.view(torch.float32)
    base = fingerprint(as_float)
    for i in (0, 777, as_float.numel() - 1):
        changed = as_float.clone()
        changed[i] = -changed[i]
        assert not torch.equal(fingerprint(changed), base)


def test_nan_payload_and_signed_zero_are_seen():
    t = torch.zeros(4)
    base = fingerprint(t)
    t[2] = -0.0
    assert not torch.equal(fingerprint(t), base)
    nan_a = torch.tensor([0x7FC00000], dtype=torch.int32).view(torch.float32)
    nan_b = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    assert not torch.equal(fingerprint(nan_a.repeat(2)), fingerprint(torch.cat([nan_a, nan_b])))


@pytest.mark.parametrize("batched", [False, True], ids=["per-tensor", "batched"])
def test_guard_names_the_one_changed_element_among_mixed_dtypes(monkeypatch, batched):
    """The batched total (used on GPUs) and the per-tensor sums catch the same single-element changes."""
    from layerfreeze import guard as guard_mod

    monkeypatch.setattr(guard_mod, "_batched", lambda device: batched)
    monkeypatch.setattr(guard_mod, "_CHUNK_BYTES", 64)  # many chunks, boundaries inside the model
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({
        "a": torch.nn.Linear(7, 5),                      # float32, odd sizes
        "b": torch.nn.Linear(3, 3).to(torch.float16),    # 2-byte elements, 9 + 3 of them: not word-aligned
        "c": torch.nn.Linear(4, 4).to(torch.bfloat16),
        "d": torch.nn.Linear(2, 2).to(torch.float64),
    })
    for p in net.parameters():
        p.requires_grad_(False)
    g = guard_mod.Guard(net)
    g.check()  # nothing changed
    for name, p in net.named_parameters():
        flat = p.data.view(-1)
        old = flat[-1].clone()
        bits = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        bits[-1] += 1  # one unit in the last place of the last element
        assert not torch.equal(flat[-1], old)
        with pytest.raises(lf.FrozenParameterChanged) as info:
            g.check()
        assert info.value.names == [name]
        g.check()  # the change was reported once and is now the reference


def test_guard_follows_a_replaced_storage(monkeypatch):
    net = torch.nn.Linear(4, 4)
    net.weight.requires_grad_(False)
    g = Guard(net)
    net.weight.data = net.weight.data.clone()  # same values, new storage: not a change
    g.check()
    net.weight.data = net.weight.data + 1      # new storage, new values
    with pytest.raises(lf.FrozenParameterChanged, match="weight"):
        g.check()


# --------------------------------------------------------------------------- order and memory layout


def test_a_permutation_changes_the_fingerprint():
    w = _rand(16, 8)
    base = fingerprint(w)
    assert not torch.equal(fingerprint(w.flip(0)), base)
    assert not torch.equal(fingerprint(w.flip(1)), base)
    assert not torch.equal(fingerprint(w[torch.randperm(16, generator=torch.Generator().manual_seed(1))]), base)


@pytest.mark.parametrize("n", [2, 9, 4096, 4097, 40_001])
def test_any_swap_of_two_different_words_changes_the_fingerprint(n):
    """Exact: S1 moves by (p - q) * (w_q - w_p), nonzero for these sizes and values."""
    w = torch.randint(-(2**40), 2**40, (n,), dtype=torch.int64, generator=torch.Generator().manual_seed(n))
    base = fingerprint(w)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p, q = torch.randint(0, n, (2,), generator=gen).tolist()
        if w[p] == w[q]:
            continue
        s = w.clone()
        s[p], s[q] = w[q], w[p]
        assert not torch.equal(fingerprint(s), base), (p, q)


def test_the_position_weighted_sum_is_exact_at_every_size():
    for n in (0, 1, 4095, 4096, 4097, 8 * 4097 + 3, 100_003):
        w = torch.randint(-(2**62), 2**62, (n,), dtype=torch.int64, generator=torch.Generator().manual_seed(n))
        idx = torch.arange(n, dtype=torch.int64)
        expected = torch.stack([w.sum(), (w * idx).sum()]) if n else torch.zeros(2, dtype=torch.int64)
        assert torch.equal(fingerprint(w), expected), n


def _one_edit(net, edit):
    fz = lf.Freezer(net)
    fz.freeze("0")
    fz.check()
    with torch.no_grad():
        edit(net[0].weight)
    with pytest.raises(lf.FrozenParameterChanged, match=r"0\.weight"):
        fz.check()
    fz.close()


def test_guard_sees_an_edit_of_a_channels_last_convolution():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).to(memory_format=torch.channels_last)
    assert not net[0].weight.is_contiguous()

    def edit(w):
        w[0, 1, 0, 0] += 1

    _one_edit(net, edit)


def test_guard_sees_an_edit_of_a_transposed_parameter():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 3))
    net[0].weight = torch.nn.Parameter(torch.randn(5, 3).t())  # a non-contiguous parameter
    assert not net[0].weight.is_contiguous()

    def edit(w):
        w[2, 4] += 1

    _one_edit(net, edit)


def test_guard_sees_rows_swapped_in_place():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 6))
    _one_edit(net, lambda w: w.copy_(w.flip(0)))


def test_guard_keeps_no_copy_of_a_non_contiguous_parameter():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).to(memory_format=torch.channels_last)
    lf.freeze(net)
    g = Guard(net)
    for e in g._entries.values():
        assert e.words.untyped_storage().data_ptr() == e.param.untyped_storage().data_ptr()


@pytest.mark.parametrize("batched", [False, True], ids=["per-tensor", "batched"])
def test_observe_records_the_step_and_the_verdict_names_it(monkeypatch, batched):
    """The comparison is recorded on the device; the verdict, read later, names the first bad step."""
    from layerfreeze import guard as guard_mod

    monkeypatch.setattr(guard_mod, "_batched", lambda device: batched)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    lf.freeze(net, "0")
    g = guard_mod.Guard(net, read_every=0)
    # read nothing on observe: the CPU shortcut reads at once, so hold it back
    monkeypatch.setattr(guard_mod.Guard, "verdict", lambda self: None)
    g.observe(step=1)
    with torch.no_grad():
        net[0].bias[1] += 1
    g.observe(step=2)
    g.observe(step=3)
    monkeypatch.undo()
    monkeypatch.setattr(guard_mod, "_batched", lambda device: batched)
    with pytest.raises(lf.FrozenParameterChanged, match=r"changed value: 0\.bias\. First seen by the check after optimizer step 2\.") as info:
        g.verdict()
    assert info.value.step == 2 and info.value.names == ["0.bias"]
    g.check()  # reported once


# --------------------------------------------------------------------------- the guard's grid fingerprint

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from layerfreeze.guard import grid_print  # noqa: E402

_PROPS = settings(max_examples=40, deadline=None)
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as integers of their own width (a view)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _tensor(draw, min_size: int = 2) -> torch.Tensor:
    """A tensor of random dtype and size, values drawn from a few bit patterns (so words collide),
    in one of three layouts: contiguous, transposed, or a misaligned slice of a longer storage."""
    dtype = draw(st.sampled_from(_DTYPES))
    n = draw(st.integers(min_size, 700))
    patterns = draw(st.lists(st.integers(0, 255), min_size=1, max_size=4))
    seq = draw(st.lists(st.sampled_from(patterns), min_size=n, max_size=n))
    raw = torch.tensor(seq, dtype=torch.int64)
    size = torch.empty((), dtype=dtype).element_size()
    top = 8 * size - 8  # the pattern in the top byte: sign and exponent bits of floats
    bits = (raw << top) if size > 1 else raw
    layout = draw(st.sampled_from(["contiguous", "transposed", "offset"]))
    if layout == "offset":
        store = torch.zeros(n + 1, dtype=_bits(torch.empty(0, dtype=dtype)).dtype)
        store[1:] = bits.to(store.dtype) if size > 1 else bits.to(torch.uint8)
        return store.view(dtype)[1:]
    t = (bits.to(torch.int64).to(_bits(torch.empty(0, dtype=dtype)).dtype) if size > 1 else bits.to(torch.uint8))
    t = t.view(dtype)
    if layout == "transposed" and n % 2 == 0:
        return t.view(2, n // 2).t()  # non-contiguous, dense: read in memory order
    return t


@st.composite
def _single_change(draw):
    t = _tensor(draw, min_size=1)
    i = draw(st.integers(0, t.numel() - 1))
    flip = draw(st.integers(0, 8 * t.element_size() - 1))  # any one bit, the sign bit included
    return t, i, flip


@st.composite
def _transposition(draw):
    t = _tensor(draw)
    i, j = draw(st.lists(st.integers(0, t.numel() - 1), min_size=2, max_size=2, unique=True))
    return t, i, j


def _at(t: torch.Tensor, i: int) -> tuple[int, ...]:
    return tuple(int(k) for k in torch.unravel_index(torch.tensor(i), t.shape))


@_PROPS
@given(_single_change())
def test_property_any_single_element_change_changes_the_grid_print(case):
    t, i, flip = case
    base = grid_print(t)
    bits = _bits(t)  # same layout, same storage
    idx = _at(t, i)
    one = torch.tensor(1, dtype=torch.int64) << flip
    bits[idx] = (bits[idx].to(torch.int64) ^ one).to(bits.dtype)
    assert not torch.equal(grid_print(t), base)


@_PROPS
@given(_transposition())
def test_property_any_transposition_of_different_elements_changes_the_grid_print(case):
    t, i, j = case
    bits = _bits(t)
    a, b = _at(t, i), _at(t, j)
    if bits[a] == bits[b]:
        return  # equal elements: swapping them changes nothing
    base = grid_print(t)
    bits[a], bits[b] = bits[b].clone(), bits[a].clone()
    assert not torch.equal(grid_print(t), base)


def test_a_swap_that_the_pair_fingerprint_misses_is_seen_by_the_guard():
    """Words that differ only in their top bit, an even distance apart: S1 moves by a multiple of 2**64."""
    w = torch.tensor([1.5, 2.5, 3.5, 4.5, 1.5, -2.5])  # words (1.5, 2.5), (3.5, 4.5), (1.5, -2.5)
    swapped = w.clone()
    swapped[1], swapped[5] = w[5], w[1]
    assert torch.equal(fingerprint(swapped), fingerprint(w))  # the documented blind spot of the pair
    assert not torch.equal(grid_print(swapped), grid_print(w))
    net = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(w.view(2, 3))
    lf.freeze(net)
    g = Guard(net)
    with torch.no_grad():
        net[0].weight.view(-1)[1], net[0].weight.view(-1)[5] = w[5], w[1]
    with pytest.raises(lf.FrozenParameterChanged, match=r"0\.weight"):
        g.observe(step=1)


def test_the_grid_print_is_its_definition_in_exact_integers():
    """Row sums, tail words, column sums, computed here with Python integers mod 2**64."""
    w = torch.randint(-(2**63), 2**63 - 1, (3 * 128 + 5,), dtype=torch.int64, generator=torch.Generator().manual_seed(3))
    vals = w.tolist()
    rows = [vals[r * 128 : (r + 1) * 128] for r in range(3)]

    def wrap(x: int) -> int:
        x %= 2**64
        return x - 2**64 if x >= 2**63 else x

    expected = [wrap(sum(r)) for r in rows] + vals[3 * 128 :] + [wrap(sum(r[c] for r in rows)) for c in range(128)]
    assert grid_print(w).tolist() == expected


def test_the_grid_print_is_the_same_on_any_thread_count():
    w = torch.randn(5000, 77, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grid_print(w)
        torch.set_num_threads(2)
        two = grid_print(w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_the_grid_print_reads_non_contiguous_storage_in_place():
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    w = conv.weight.detach()
    assert not w.is_contiguous()
    base = grid_print(w)
    w[3, 2, 1, 0] = torch.nextafter(w[3, 2, 1, 0], torch.tensor(1.0))  # through the real storage
    assert not torch.equal(grid_print(w), base)
    # memory order, not logical order: the contiguous copy is another sequence of words
    assert not torch.equal(grid_print(w), grid_print(w.contiguous()))


# --------------------------------------------------------------------------- the guard: when a change is seen


def _big_frozen_net(rows: int = 96, cols: int = 128) -> torch.nn.Module:
    """A frozen weight large enough that its column sums rotate (12288 floats, 6144 words)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(cols, rows), torch.nn.Linear(rows, 2))
    lf.freeze(net, "0")
    return net


def test_a_value_change_in_a_rotating_tensor_is_named_at_the_very_next_check():
    net = _big_frozen_net()
    g = Guard(net, order_every=8)
    for step in range(1, 4):
        g.observe(step=step)
    with torch.no_grad():
        net[0].weight[50, 7] += 1e-3
    with pytest.raises(lf.FrozenParameterChanged, match=r"First seen by the check after optimizer step 4\. Likely") as info:
        g.observe(step=4)
    assert info.value.step == 4 and info.value.names == ["0.weight"]


@pytest.mark.parametrize("on_device", [False, True], ids=["host record", "device record"])
def test_a_swap_within_a_row_is_seen_within_order_every_checks_and_its_window_named(monkeypatch, on_device):
    from layerfreeze import guard as guard_mod

    monkeypatch.setattr(guard_mod, "_keeps_record", lambda device: on_device)
    monkeypatch.setattr(guard_mod.Guard, "verdict", lambda self: None)  # read once, at the end
    net = _big_frozen_net()
    k = 8
    g = guard_mod.Guard(net, order_every=k, read_every=0)
    w = net[0].weight
    for step in range(1, 2 * k + 1):
        g.observe(step=step)
    # two different values in one grid row of 128 words (elements 40*256 .. 40*256+255), both the
    # upper half of their word: the row sum stays, two column sums move
    a, b = divmod(40 * 256 + 3, 128), divmod(40 * 256 + 201, 128)
    assert not torch.equal(w[a], w[b])
    with torch.no_grad():
        w[a], w[b] = w[b].clone(), w[a].clone()
    steps = list(range(2 * k + 1, 3 * k + 1))
    for step in steps:  # a whole round: the row's slice comes up once
        g.observe(step=step)
    monkeypatch.undo()
    monkeypatch.setattr(guard_mod, "_keeps_record", lambda device: on_device)
    with pytest.raises(lf.FrozenParameterChanged, match=r"Only the order of values changed") as info:
        g.verdict()
    assert info.value.names == ["0.weight"]
    # seen when the slice holding grid row 40 comes up; the window starts at that slice's previous check
    seen = info.value.step
    assert seen in steps
    assert f"First seen by the check after optimizer step {seen}." in str(info.value)
    assert f"it changed after optimizer step {seen - k}." in str(info.value)
    g.check()  # reported once


def test_check_compares_every_column_at_once():
    net = _big_frozen_net()
    g = Guard(net, order_every=8)
    g.observe(step=1)
    w = net[0].weight
    with torch.no_grad():
        w[20, 0:2], w[20, 64:66] = w[20, 64:66].clone(), w[20, 0:2].clone()  # whole words, one grid row
    with pytest.raises(lf.FrozenParameterChanged, match=r"changed value: 0\.weight\. First seen by the check "
                       r"after optimizer step 2\. Only the order of values changed") as info:
        g.check(step=2)
    assert info.value.step == 2 and info.value.names == ["0.weight"]


def test_a_change_before_a_freeze_change_is_still_reported():
    """The references are read again when the frozen set changes; what moved before is not accepted."""
    net = _big_frozen_net()
    g = Guard(net, order_every=8)
    g.observe(step=1)
    w = net[0].weight
    with torch.no_grad():
        w[30, 0:2], w[30, 64:66] = w[30, 64:66].clone(), w[30, 0:2].clone()  # order only
    net[1].bias.requires_grad_(False)  # a freeze change: the guard regroups at its next check
    with pytest.raises(lf.FrozenParameterChanged, match=r"changed value: 0\.weight\. First seen by the check "
                       r"after optimizer step 2\. Likely"):
        g.observe(step=2)
    g.observe(step=3)


@pytest.mark.parametrize("order_every", [1, 8])
def test_observe_on_device_records_with_tensors(monkeypatch, order_every):
    """The record path used on accelerators (tensors, torch.where), run on the CPU."""
    from layerfreeze import guard as guard_mod

    monkeypatch.setattr(guard_mod, "_keeps_record", lambda device: True)
    monkeypatch.setattr(guard_mod, "_batched", lambda device: True)
    net = _big_frozen_net()
    g = guard_mod.Guard(net, order_every=order_every, read_every=0)
    g.observe(step=1)
    d = next(iter(g._devices.values()))
    assert isinstance(d.first, torch.Tensor) and int(d.first) == -1
    with torch.no_grad():
        net[0].bias[5] += 1
    g.observe(step=2)
    g.observe(step=3)
    assert int(d.first) == 2 and int(d.since) == -1
    with pytest.raises(lf.FrozenParameterChanged, match=r"0\.bias\. First seen by the check after optimizer step 2\. Likely"):
        g.verdict()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_order_every_must_be_a_positive_count(bad):
    net = torch.nn.Linear(2, 2)
    with pytest.raises(lf.ArgumentError, match=r"order_every must be an int >= 1, got .*order_every=8"):
        Guard(net, order_every=bad)


def test_empty_and_tiny_frozen_parameters_are_checked():
    net = torch.nn.Module()
    net.empty = torch.nn.Parameter(torch.zeros(0))
    net.one = torch.nn.Parameter(torch.ones(1))
    lf.freeze(net)
    g = Guard(net)
    g.observe(step=1)
    with torch.no_grad():
        net.one.neg_()
    with pytest.raises(lf.FrozenParameterChanged, match=r"changed value: one\. First seen by the check after "
                       r"optimizer step 2\."):
        g.observe(step=2)


@st.composite
def _guard_case(draw):
    t = _tensor(draw)
    kind = draw(st.sampled_from(["single change", "transposition", "transposition in one row"]))
    p = draw(st.integers(0, t.numel() - 1))
    q = draw(st.integers(0, t.numel() - 1).filter(lambda q: q != p))
    flip = draw(st.integers(0, 8 * t.element_size() - 1))
    r = draw(st.integers(1, 3))
    return t, kind, p, q, flip, r


@_PROPS
@given(_guard_case(), st.integers(1, 5))
def test_property_the_guard_sees_any_single_change_or_transposition(case, order_every):
    """A frozen parameter, rows of 4 words and every tensor spread over ``order_every`` checks: a
    single change is named at the next check; a transposition within ``order_every`` checks.
    Positions are in memory order; "in one row" swaps two elements at the same place of two words
    of one row, which no row sum sees."""
    from layerfreeze import guard as guard_mod

    t, kind, p, q, flip, r = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(guard_mod, "_ROW", 4)
        mp.setattr(guard_mod, "_SMALL", 8)
        net = torch.nn.Module()
        net.w = torch.nn.Parameter(t, requires_grad=False)
        net.other = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
        g = Guard(net, order_every=order_every)
        g.observe(step=0)
        mem = guard_mod._memory(_bits(net.w.data))[0]  # a view of the storage, in memory order
        assert mem.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        per_word = guard_mod._words(t)[0].element_size() // t.element_size()
        if kind == "transposition in one row":
            start = p // (4 * per_word) * (4 * per_word)
            q = start + (p - start + r * per_word) % (4 * per_word)
            if q >= t.numel() or q == p:
                return
        if kind == "single change":
            mem[p] = (mem[p].to(torch.int64) ^ (torch.tensor(1, dtype=torch.int64) << flip)).to(mem.dtype)
            budget = 1
        else:
            if mem[p] == mem[q]:
                return
            mem[p], mem[q] = mem[q].clone(), mem[p].clone()
            budget = order_every
        with pytest.raises(lf.FrozenParameterChanged) as info:
            for step in range(1, budget + 1):
                g.observe(step=step)
        assert info.value.names == ["w"]
        assert info.value.step is not None and 1 <= info.value.step <= budget


@pytest.mark.parametrize("on_device", [False, True], ids=["host record", "device record"])
def test_a_storage_replaced_by_one_of_another_size_is_a_change(monkeypatch, on_device):
    from layerfreeze import guard as guard_mod

    monkeypatch.setattr(guard_mod, "_keeps_record", lambda device: on_device)
    net = _big_frozen_net()
    g = guard_mod.Guard(net)
    g.observe(step=1)
    net[0].weight.data = torch.zeros(97, 128)
    with pytest.raises(lf.FrozenParameterChanged, match=r"0\.weight\. First seen by the check after optimizer step 2\."):
        g.observe(step=2)
        g.verdict()
