"""Property-based tests of the core's contracts (hypothesis).

Random models (nested containers, tied weights, parametrized weights), random
selector sets and random sequences of freeze / unfreeze / ``frozen()`` blocks /
bad calls interleaved with optimizer steps of random kinds. The invariants:

* a parameter frozen through layerfreeze keeps its value bitwise while frozen;
* counts agree with the ``requires_grad`` flags;
* ``frozen()`` restores flags, modes and gradients exactly;
* a Freezer's ``state_dict`` loaded into a fresh Freezer on a copy gives the same state;
* a call that fails changes nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import layerfreeze as lf

settings.register_profile(
    "layerfreeze", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile("layerfreeze")

DIM = 4


@st.composite
def models(draw: st.DrawFn) -> nn.Module:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    blocks = []
    for _ in range(draw(st.integers(2, 4))):
        kind = draw(st.sampled_from(["linear", "nested", "dict", "norm", "weight_norm"]))
        if kind == "linear":
            blocks.append(nn.Linear(DIM, DIM))
        elif kind == "nested":
            blocks.append(nn.Sequential(nn.Linear(DIM, DIM), nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh())))
        elif kind == "dict":
            blocks.append(_Dict())
        elif kind == "norm":
            blocks.append(nn.Sequential(nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM), nn.Dropout(0.1)))
        else:
            blocks.append(nn.utils.parametrizations.weight_norm(nn.Linear(DIM, DIM)))
    net = nn.Sequential(*blocks, nn.Linear(DIM, DIM))
    if draw(st.booleans()):  # tie the last layer to the first plain linear layer
        first = next(m for m in net.modules() if isinstance(m, nn.Linear) and "weight" in m._parameters)
        net[-1].weight = first.weight
    return net


class _Dict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({"a": nn.Linear(DIM, DIM), "b": nn.Linear(DIM, DIM)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts["a"](x) + self.parts["b"](x)


def _selectors(net: nn.Module) -> list[str]:
    names = [n for n, _ in net.named_modules() if n]
    return names + ["**.bias", "re:.*weight.*", "type:Linear", "[0]", "[-2:]"]


def _flags(net: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in net.named_parameters()}


def _values(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _optimizer(kind: str, net: nn.Module) -> torch.optim.Optimizer:
    params = list(net.parameters())
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.1)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    return torch.optim.RMSprop(params, lr=0.01, momentum=0.5)


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, *, set_to_none: bool) -> None:
    opt.zero_grad(set_to_none=set_to_none)
    if not any(p.requires_grad for p in net.parameters()):
        return
    net(torch.randn(8, DIM)).pow(2).mean().backward()
    opt.step()


ops = st.lists(
    st.tuples(st.sampled_from(["freeze", "unfreeze", "step", "frozen", "bad"]), st.integers(0, 10**6)),
    min_size=3,
    max_size=10,
)


@settings(PROFILE)
@given(net=models(), kind=st.sampled_from(["sgd", "adam", "adamw", "rmsprop"]), steps=ops,
       set_to_none=st.booleans())
def test_frozen_values_never_move_and_counts_agree(net, kind, steps, set_to_none) -> None:
    net.train()
    opt = _optimizer(kind, net)
    fz = lf.Freezer(net, opt)
    names = _selectors(net)
    for op, pick in steps:
        sel = names[pick % len(names)]
        frozen_before = {n for n, f in _flags(net).items() if not f}
        values = _values(net)
        if op == "freeze":
            fz.freeze(sel, mode=["norm", "eval", "keep"][pick % 3])
        elif op == "unfreeze":
            fz.unfreeze(sel)
        elif op == "step":
            _train_step(net, opt, set_to_none=set_to_none)
            for n in frozen_before:  # bitwise: nothing at all may touch them
                assert torch.equal(net.get_parameter(n), values[n]), n
        elif op == "frozen":
            flags, modes = _flags(net), {n: m.training for n, m in net.named_modules()}
            held = lf.core.kept_in_eval(net)
            with lf.frozen(net, sel):
                _train_step(net, opt, set_to_none=set_to_none)
            assert _flags(net) == flags
            assert {n: m.training for n, m in net.named_modules()} == modes
            assert lf.core.kept_in_eval(net) == held
        else:
            flags = _flags(net)
            with pytest.raises(lf.LayerFreezeError):
                fz.freeze(sel, "no.such.module")
            with pytest.raises(lf.LayerFreezeError):
                lf.apply_change(net, freeze=[n for n, _ in net.named_parameters()][:1] + ["missing"])
            assert _flags(net) == flags and _values(net).keys() == values.keys()
            for n in values:
                assert torch.equal(net.get_parameter(n), values[n])
        counts = lf.count_parameters(net)
        unique = {id(p): p for p in net.parameters()}.values()
        assert counts.trainable == sum(p.numel() for p in unique if p.requires_grad)
        assert counts.trainable + counts.frozen == counts.total == sum(p.numel() for p in unique)
        fz.check()
    fz.close()


@settings(PROFILE)
@given(net=models(), picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=3), grads=st.booleans())
def test_frozen_block_restores_gradients_exactly(net, picks, grads) -> None:
    if grads:
        net(torch.randn(4, DIM)).sum().backward()
    before = {n: (None if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()}
    flags = _flags(net)
    names = _selectors(net)
    with lf.frozen(net, *[names[i % len(names)] for i in picks]):
        pass
    assert _flags(net) == flags
    for n, p in net.named_parameters():
        if before[n] is None:
            assert p.grad is None
        else:
            assert p.grad is not None and torch.equal(p.grad, before[n])


@settings(PROFILE)
@given(net=models(), picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=4), epoch=st.integers(0, 5))
def test_state_dict_round_trips(net, picks, epoch) -> None:
    names = _selectors(net)
    schedule = lf.Schedule().freeze(names[picks[0] % len(names)], until_epoch=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, schedule)
    fz.set_epoch(epoch)
    for i in picks[1:]:
        fz.freeze(names[i % len(names)])
    state = fz.state_dict()
    twin = copy.deepcopy(net)
    lf.unfreeze(twin)
    fz2 = lf.Freezer(twin, torch.optim.SGD(twin.parameters(), lr=0.1),
                     lf.Schedule().freeze(names[picks[0] % len(names)], until_epoch=3))
    fz2.load_state_dict(state)
    assert _flags(twin) == _flags(net)
    assert lf.core.kept_in_eval(twin) == lf.core.kept_in_eval(net)
    assert fz2.state_dict() == state
