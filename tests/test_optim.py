"""The optimizer kept in step with freeze changes: the traps of plain PyTorch
shown happening and then prevented, and the Freezer's group policy
(``unfreeze_lr``, ``release_state``)."""

from __future__ import annotations

import torch
from torch import nn

import layerfreeze as lf


def train_step(model: nn.Module, opt: torch.optim.Optimizer, *, set_to_none: bool = True) -> None:
    opt.zero_grad(set_to_none=set_to_none)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    model(x).pow(2).mean().backward()
    opt.step()


def mse_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=False)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    nn.functional.mse_loss(model(x), torch.zeros(4, 1)).backward()
    opt.step()


def plain_freeze(model: nn.Module, prefix: str, flag: bool = False) -> None:
    """What the seed does: flip requires_grad by name."""
    for name, p in model.named_parameters():
        if name.count(prefix):
            p.requires_grad = flag


# --------------------------------------------------------------------------- AdamW moves a frozen weight


def test_trap_adamw_moves_a_frozen_parameter_with_a_zero_grad(net):
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1)
    train_step(net, opt)  # fc2 has trained: it has a grad and Adam state
    plain_freeze(net, "fc2")
    w = net.fc2.weight.detach().clone()
    train_step(net, opt, set_to_none=False)
    assert not net.fc2.weight.requires_grad
    assert torch.count_nonzero(net.fc2.weight.grad) == 0  # a zero grad, not None
    assert not torch.equal(net.fc2.weight, w)  # the trap: "frozen", yet it moved


def test_layerfreeze_keeps_the_adamw_parameter_still(net):
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1)
    fz = lf.Freezer(net, opt)
    train_step(net, opt)
    fz.freeze("fc2")
    assert net.fc2.weight.grad is None
    w = net.fc2.weight.detach().clone()
    for _ in range(3):
        train_step(net, opt, set_to_none=False)
        net.fc2.weight.grad = torch.zeros_like(w)  # stale grads from other code are dropped too
    assert torch.equal(net.fc2.weight, w)


# --------------------------------------------------------------------------- filter-built optimizer


def test_trap_filter_built_optimizer_never_trains_an_unfrozen_param(net):
    plain_freeze(net, "fc2")
    opt = torch.optim.Adam(filter(lambda p: p.requires_grad, net.parameters()), lr=0.1)
    plain_freeze(net, "fc2", flag=True)  # unfreeze later
    w = net.fc2.weight.detach().clone()
    for _ in range(3):
        train_step(net, opt)
    assert net.fc2.weight.requires_grad and net.fc2.weight.grad is not None
    assert torch.equal(net.fc2.weight, w)  # the trap: no error, no training


def test_layerfreeze_adds_the_unfrozen_param_to_the_optimizer(net):
    lf.freeze(net, "fc2")
    opt = torch.optim.Adam(filter(lambda p: p.requires_grad, net.parameters()), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.unfreeze("fc2")
    w = net.fc2.weight.detach().clone()
    train_step(net, opt)
    assert not torch.equal(net.fc2.weight, w)


# --------------------------------------------------------------------------- group policy


def test_freezer_keeps_the_optimizer_in_step(net) -> None:
    opt = torch.optim.AdamW([p for n, p in net.named_parameters() if not n.startswith("fc2")], lr=0.1)
    fz = lf.Freezer(net, opt, None, guard=True, release_state=False, unfreeze_lr=0.02)
    assert fz.model is net
    assert fz.freeze("fc2", mode="norm") == ["fc2.weight", "fc2.bias"]
    assert fz.unfreeze("fc2.weight", lr=0.3) == ["fc2.weight"]
    assert opt.param_groups[-1]["params"] == [net.fc2.weight]
    assert opt.param_groups[-1]["lr"] == opt.param_groups[-1]["initial_lr"] == 0.3
    fz.unfreeze("fc2.bias")
    assert opt.param_groups[-1]["lr"] == 0.02  # unfreeze_lr
    fz.freeze("fc1")
    fz.unfreeze("fc1")  # held at 0.1: unfreeze_lr is its base lr now, in a group of its own
    assert len(opt.param_groups) == 4
    assert opt.param_groups[-1]["params"] == [net.fc1.weight, net.fc1.bias]
    assert opt.param_groups[-1]["lr"] == 0.02
    fz.freeze("fc1")
    fz.unfreeze("fc1")  # already in a group at that lr: nothing added
    assert len(opt.param_groups) == 4


def test_freezer_falls_back_to_group_zero_lr_and_release_state_drops_state(net) -> None:
    opt = torch.optim.Adam(net.fc1.parameters(), lr=0.07)
    fz = lf.Freezer(net, opt, release_state=True)
    lf.freeze(net, "fc2")
    fz.unfreeze("fc2")
    assert opt.param_groups[-1]["lr"] == 0.07
    mse_step(net, opt)
    assert net.fc2.weight in opt.state
    fz.freeze("fc2")
    assert net.fc2.weight not in opt.state and net.fc1.weight in opt.state
