"""LR schedulers through gradual unfreezing: every group follows group 0's factor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.conftest import stack
from torch import nn
from torch.optim import lr_scheduler as sched

import layerfreeze as lf

LR = 0.1
DECAY = 0.5


def gradual() -> lf.Schedule:
    return lf.Schedule().gradual_unfreeze("0", start_epoch=1, lr_decay=DECAY)


def one_cycle(opt: torch.optim.Optimizer) -> Any:
    # OneCycleLR sets each group's lr from max_lr itself: per group keeps the ratios
    return sched.OneCycleLR(opt, max_lr=[10 * g["lr"] for g in opt.param_groups], total_steps=20)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda opt: sched.LambdaLR(opt, lambda e: 0.9**e),
    "StepLR": lambda opt: sched.StepLR(opt, step_size=3, gamma=0.5),
    "MultiStepLR": lambda opt: sched.MultiStepLR(opt, milestones=[2, 5, 7], gamma=0.3),
    "ExponentialLR": lambda opt: sched.ExponentialLR(opt, gamma=0.8),
    "CosineAnnealingLR": lambda opt: sched.CosineAnnealingLR(opt, T_max=10),
    "OneCycleLR": one_cycle,
    "ReduceLROnPlateau": lambda opt: sched.ReduceLROnPlateau(opt, factor=0.5, patience=0),
}


def scale_of(model: nn.Sequential) -> dict[int, float]:
    """Each parameter's expected lr scale: the head 1, layer k from the top DECAY**k."""
    out = {id(p): 1.0 for p in model[1].parameters()}
    layers = list(model[0])
    for k, layer in enumerate(reversed(layers)):
        out.update({id(p): DECAY**k for p in layer.parameters()})
    return out


@pytest.mark.parametrize("built_from", ["head", "all"])
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_group_follows_group_zero_factor(name: str, order: str, built_from: str) -> None:
    model = stack()
    params = model[1].parameters() if built_from == "head" else model.parameters()
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    make = SCHEDULERS[name]
    if order == "before":
        s = make(opt)
        fz = lf.Freezer(model, opt, gradual(), lr_scheduler=s)
    else:
        fz = lf.Freezer(model, opt, gradual())
        s = make(opt)
    scales = scale_of(model)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    head_lrs = []
    for epoch in range(6):
        fz.set_epoch(epoch)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            s.step(1.0) if isinstance(s, sched.ReduceLROnPlateau) else s.step()
            head = opt.param_groups[0]["lr"]
            head_lrs.append(head)
            for group in opt.param_groups:
                expected = {scales[id(p)] for p in group["params"]}
                assert len(expected) == 1
                # its base lr (LR * DECAY**k) times the factor group 0 gets now (head / LR)
                assert group["lr"] == pytest.approx(LR * expected.pop() * head / LR, rel=1e-9)
    assert len(set(head_lrs)) > 2  # the scheduler did change the lr
    assert all(p.requires_grad for p in model.parameters())


def test_plain_lambdalr_breaks_after_add_param_group() -> None:
    model = stack()
    opt = torch.optim.SGD(model[1].parameters(), lr=LR)
    s = sched.LambdaLR(opt, lambda e: 0.9**e)
    opt.add_param_group({"params": list(model[0].parameters()), "lr": LR})
    opt.step()
    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is shorter than argument 1"):
        s.step()


def test_plain_steplr_silently_starts_new_group_from_raw_lr() -> None:
    model = stack()
    opt = torch.optim.SGD(model[1].parameters(), lr=LR)
    s = sched.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.step()
        s.step()
    opt.add_param_group({"params": list(model[0].parameters()), "lr": LR})
    opt.step()
    s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR / 8)
    assert opt.param_groups[1]["lr"] == pytest.approx(LR / 2)  # not LR / 8: it missed two decays


def test_layerfreeze_repairs_lambdalr_made_before_the_freezer() -> None:
    model = stack()
    opt = torch.optim.SGD(model[1].parameters(), lr=LR)
    s = sched.LambdaLR(opt, lambda e: 0.9**e)
    fz = lf.Freezer(model, opt, lf.Schedule().gradual_unfreeze("0", start_epoch=1), lr_scheduler=s)
    for epoch in range(3):
        fz.set_epoch(epoch)
        opt.step()
        s.step()  # no ValueError
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([LR * 0.9**3] * 2)
    assert len(s.lr_lambdas) == len(s.base_lrs) == 2


def test_groups_added_later_are_repaired_too() -> None:
    model = stack()
    opt = torch.optim.SGD(model[1].parameters(), lr=LR)
    s = sched.LambdaLR(opt, lambda e: 0.5**e)
    fz = lf.Freezer(model, opt, lr_scheduler=[s])
    for _ in range(2):
        opt.step()
        s.step()
    lf.freeze(model, "0")
    fz.unfreeze("0.2", lr=0.4)  # no rule foresaw this one: added now
    assert opt.param_groups[1]["lr"] == pytest.approx(0.4 * 0.25)
    opt.step()
    s.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([LR / 8, 0.4 / 8])


def test_nested_schedulers_are_repaired() -> None:
    model = stack()
    opt = torch.optim.SGD(model[1].parameters(), lr=LR)
    warm = sched.LinearLR(opt, start_factor=0.5, total_iters=2)
    decay = sched.LambdaLR(opt, lambda e: 0.9**e)
    s = sched.SequentialLR(opt, [warm, decay], milestones=[2])
    fz = lf.Freezer(model, opt, gradual(), lr_scheduler=s)
    for epoch in range(5):
        fz.set_epoch(epoch)
        opt.step()
        s.step()
        head = opt.param_groups[0]["lr"]
        assert [g["lr"] for g in opt.param_groups[1:]] == pytest.approx([head * DECAY**2, head * DECAY, head])


def test_lr_scheduler_argument_is_checked() -> None:
    model = stack()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    other = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(TypeError, match="lr_scheduler must be a torch LR scheduler"):
        lf.Freezer(model, opt, lr_scheduler="cosine")
    with pytest.raises(ValueError, match="schedules a different optimizer"):
        lf.Freezer(model, opt, lr_scheduler=sched.StepLR(other, 1))
    with pytest.raises(ValueError, match="needs the optimizer"):
        lf.Freezer(model, lr_scheduler=sched.StepLR(other, 1))


class Wrapped(torch.optim.Optimizer):
    """An optimizer wrapper shaped like accelerate's ``AcceleratedOptimizer``
    (which the Hugging Face Trainer uses): an Optimizer subclass that skips
    ``Optimizer.__init__``, holds the real optimizer as ``.optimizer`` and
    exposes its very param groups."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)


class WrappedScheduler:
    """Shaped like accelerate's ``AcceleratedScheduler``: the torch scheduler as ``.scheduler``."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def step(self) -> None:
        self.scheduler.step()


@pytest.mark.parametrize("give", ["inner", "wrapper"])
def test_a_scheduler_built_on_an_optimizer_wrapper_is_accepted_and_repaired(give: str) -> None:
    model = stack()
    inner = torch.optim.SGD(model[1].parameters(), lr=LR)
    wrapper = Wrapped(inner)
    s = sched.LambdaLR(wrapper, lambda e: 0.9**e)  # built on the wrapper, before the Freezer
    assert s.optimizer is wrapper
    fz = lf.Freezer(model, wrapper if give == "wrapper" else inner, gradual(), lr_scheduler=WrappedScheduler(s))
    assert fz.lr_schedulers == [s]
    scales = scale_of(model)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for epoch in range(4):
        fz.set_epoch(epoch)
        frozen = [p.detach().clone() for p in model[0].parameters() if not p.requires_grad]
        wrapper.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        wrapper.step()
        s.step()
        still = [p for p in model[0].parameters() if not p.requires_grad]
        assert all(torch.equal(a, b) for a, b in zip(frozen, still, strict=False))
        head = inner.param_groups[0]["lr"]
        for group in inner.param_groups:
            (scale,) = {scales[id(p)] for p in group["params"]}
            assert group["lr"] == pytest.approx(scale * head, rel=1e-9)
    assert all(p.requires_grad for p in model.parameters())
    # the guard sits on the torch optimizer inside, so it sees steps through the wrapper
    lf.freeze(model, "1")
    with torch.no_grad():
        model[1].bias.add_(1.0)
    with pytest.raises(lf.FrozenParameterChanged):
        wrapper.step()


def test_a_scheduler_of_another_optimizer_is_still_refused_through_a_wrapper() -> None:
    model = stack()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    other = Wrapped(torch.optim.SGD(model.parameters(), lr=LR))
    with pytest.raises(ValueError, match="schedules a different optimizer"):
        lf.Freezer(model, Wrapped(opt), lr_scheduler=sched.StepLR(other, 1))
    assert not opt._optimizer_step_pre_hooks  # refused before any hook was attached
