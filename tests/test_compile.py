"""Freeze transitions on a ``torch.compile``d model: right gradients, at most
one recompilation per transition."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.conftest import Mlp
from torch import nn

import layerfreeze as lf


class CountingBackend:
    """A dynamo backend that runs graphs eagerly and counts compilations."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.compiles += 1
        return gm.forward


def _schedule() -> lf.Schedule:
    # epoch 0: fc2 frozen; 1: all trainable; 2: fc1 frozen; 3: fc3 frozen
    return (
        lf.Schedule()
        .freeze("fc2", until_epoch=1)
        .freeze("fc1", from_epoch=2, until_epoch=3)
        .freeze("fc3", from_epoch=3)
    )


def _run(compiled: bool) -> tuple[list[dict[str, torch.Tensor | None]], list[int], list[list[str]]]:
    torch.manual_seed(0)
    net = Mlp()
    backend = CountingBackend()
    model = torch.compile(net, backend=backend) if compiled else net
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(model, opt, _schedule())
    grads, compiles, actions = [], [], []
    g = torch.Generator().manual_seed(1)
    for epoch in range(4):
        actions.append([t.action for t in fz.set_epoch(epoch)])
        for _ in range(2):
            x, y = torch.randn(5, 4, generator=g), torch.randn(5, 1, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(fz.model(x), y).backward()
            grads.append({n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()})
            opt.step()
        compiles.append(backend.compiles)
    return grads, compiles, actions


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    torch._dynamo.reset()
    out = {"eager": _run(False), "compiled": _run(True)}
    torch._dynamo.reset()
    return out


def test_compiled_gradients_match_eager_and_frozen_get_none(runs: dict[str, Any]) -> None:
    eager, compiled = runs["eager"][0], runs["compiled"][0]
    frozen_by_step = [("fc2",)] * 2 + [()] * 2 + [("fc1",)] * 2 + [("fc3",)] * 2
    for step, (ge, gc) in enumerate(zip(eager, compiled, strict=True)):
        for name in ge:
            layer = name.split(".")[0]
            if layer in frozen_by_step[step]:
                assert gc[name] is None, (step, name)
            else:
                assert gc[name] is not None and torch.equal(gc[name], ge[name]), (step, name)


def test_each_transition_costs_at_most_one_recompile(runs: dict[str, Any]) -> None:
    compiles, actions = runs["compiled"][1], runs["compiled"][2]
    assert actions == [["freeze"], ["unfreeze"], ["freeze"], ["freeze", "unfreeze"]]
    assert compiles[0] == 1
    for before, after in zip(compiles, compiles[1:], strict=False):
        assert after - before <= 1
    # three new trainable sets after the first: at most three recompiles
    assert compiles[-1] <= 4


def test_plain_compiled_model_recompiles_on_requires_grad_flip() -> None:
    # the cost being bounded: dynamo guards on requires_grad, so a flip is
    # always seen (no stale graph computing gradients for a frozen weight)
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Mlp()
    backend = CountingBackend()
    model = torch.compile(net, backend=backend)
    x = torch.randn(3, 4)
    model(x).sum().backward()
    net.fc1.requires_grad_(False)
    net.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert net.fc1.weight.grad is None
    assert backend.compiles == 2
    torch._dynamo.reset()


def _side_by_side(net: nn.Module, plan: lf.Schedule, compile_: Any, epochs: int) -> tuple[Any, list[int]]:
    """Train ``net`` compiled with ``cache=True`` next to an eager copy without it; every
    step's loss must agree. Returns the cached Freezer and its hits after each epoch."""
    import copy

    import torch.nn.functional as F

    ref = copy.deepcopy(net)
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    opt, ref_opt = torch.optim.SGD(net.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, plan, cache=True)
    ref_fz = lf.Freezer(ref, ref_opt, copy.deepcopy(plan))
    compiled = compile_(net)
    hits = []
    for epoch in range(epochs):
        fz.set_epoch(epoch)
        ref_fz.set_epoch(epoch)
        for i in torch.randperm(24, generator=torch.Generator().manual_seed(epoch)).split(8):
            opt.zero_grad()
            ref_opt.zero_grad()
            a, b = F.cross_entropy(compiled(x[i]), y[i]), F.cross_entropy(ref(x[i]), y[i])
            a.backward()
            b.backward()
            opt.step()
            ref_opt.step()
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        hits.append(fz.skip_stats().hits)
    return fz, hits


def test_skipping_under_torch_compile_trains_like_eager_without_it() -> None:
    """Freezer(cache=...) on a compiled model: the hooks and instance forwards of the
    skipped prefix run, and every
    step's loss is the uncached eager model's (dynamo runs them eagerly: see the tests below)."""
    import warnings

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    plan = lf.Schedule().progressive_freeze(["[0]", "[2]"], start=0.2, end=0.4, total_epochs=5, mode="eval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes on what it runs eagerly
        fz, hits = _side_by_side(net, plan, lambda m: torch.compile(m, backend=CountingBackend()), 5)
    st = fz.skip_stats()
    assert st.skipping and st.module == "2"
    assert hits[-1] - hits[-2] == 24  # the last epoch: every sample served from the store


class _Encoder(nn.Module):
    """A model class of the user's own (dynamo compiles its forward as a frame of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def _count_compiles() -> tuple[list[int], Any]:
    """A progressive plan over ``_Encoder``'s body with ``cache=True``, the Freezer made
    before ``torch.compile`` (counting backend): compilations so far after each epoch, and the Freezer."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = _Encoder()
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    plan = lf.Schedule().progressive_freeze(["body.0", "body.2", "body.4"], start=0.0, end=0.5, total_epochs=4,
                                            mode="eval")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, plan, cache=True)
    backend = CountingBackend()
    compiled = torch.compile(net, backend=backend)
    per_epoch = []
    for epoch in range(4):
        fz.set_epoch(epoch)
        for i in torch.randperm(24, generator=torch.Generator().manual_seed(epoch)).split(8):
            opt.zero_grad()
            F.cross_entropy(compiled(x[i]), y[i]).backward()
            opt.step()
        per_epoch.append(backend.compiles)
    return per_epoch, fz


def test_skipping_under_torch_compile_compiles_a_few_graphs_not_one_per_forward() -> None:
    """The party's hooks and the skipped modules' forwards run eagerly, outside dynamo's
    tracing: traced, their state (locks, plans, stores) made dynamo recompile at almost
    every forward (61 compilations over these 4 epochs), and each compilation of a real
    backend takes seconds."""
    torch._dynamo.reset()
    per_epoch, fz = _count_compiles()
    st = fz.skip_stats()
    assert st.skipping and st.module == "body" and st.hits >= 24
    assert 1 <= per_epoch[-1] <= 4, per_epoch  # the user's forward is compiled, a few times in all
    torch._dynamo.reset()


def test_skipping_under_the_default_compile_backend_trains_like_eager() -> None:
    """With inductor (torch.compile's default), tracing the skipping hooks crashed in
    AOT autograd ("setStorage: ... out of bounds") in the first epoch."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plan = lf.Schedule().progressive_freeze(["body.0", "body.2", "body.4"], start=0.0, end=0.5, total_epochs=4,
                                            mode="eval")
    fz, _ = _side_by_side(_Encoder(), plan, torch.compile, 4)
    st = fz.skip_stats()
    assert st.skipping and st.module == "body" and st.hits >= 24
    torch._dynamo.reset()


_FRESH = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.test_compile import _count_compiles
assert "torch._dynamo" not in sys.modules  # the Freezer's eager runner is made mid-trace
per_epoch, fz = _count_compiles()
print(per_epoch[-1], fz.skip_stats().module, fz.skip_stats().hits)
"""


def test_a_freezer_made_before_dynamo_is_loaded_compiles_a_few_graphs_too() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _FRESH, str(root)], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    compiles, module, hits = done.stdout.split()
    assert 1 <= int(compiles) <= 4 and module == "body" and int(hits) >= 24, done.stdout
