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
