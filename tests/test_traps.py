"""The silent traps of freezing in plain PyTorch, each shown happening and
then prevented by layerfreeze."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import layerfreeze as lf


def train_step(model: nn.Module, opt: torch.optim.Optimizer, *, set_to_none: bool = True) -> None:
    opt.zero_grad(set_to_none=set_to_none)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    model(x).pow(2).mean().backward()
    opt.step()


def plain_freeze(model: nn.Module, prefix: str, flag: bool = False) -> None:
    """What the seed does: flip requires_grad by name."""
    for name, p in model.named_parameters():
        if name.count(prefix):
            p.requires_grad = flag


# --------------------------------------------------------------------------- 1. AdamW moves a frozen weight


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


# --------------------------------------------------------------------------- 2. BatchNorm statistics drift


def test_trap_model_train_undoes_eval_and_batchnorm_stats_drift(cnn):
    for p in cnn.features.parameters():
        p.requires_grad = False
    cnn.features.eval()
    cnn.train()  # the usual start of every epoch
    assert cnn.features[1].training  # the eval() is gone
    stats = cnn.features[1].running_mean.clone()
    cnn(torch.randn(4, 3, 5, 5))
    assert not torch.equal(cnn.features[1].running_mean, stats)  # the trap: "frozen" stats moved


def test_layerfreeze_holds_batchnorm_statistics(cnn):
    lf.freeze(cnn, "features")
    cnn.train()
    assert not cnn.features[1].training and not cnn.features[4].training
    buffers = {n: b.clone() for n, b in cnn.named_buffers()}
    cnn(torch.randn(4, 3, 5, 5))
    assert all(torch.equal(b, buffers[n]) for n, b in cnn.named_buffers())


# --------------------------------------------------------------------------- 3. filter-built optimizer


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


# --------------------------------------------------------------------------- 4. tied weights


def test_trap_tied_weights_silent_alias_and_double_count(tied_lm):
    # freezing the embedding by name silently freezes the head's weight too
    plain_freeze(tied_lm, "embed")
    assert not tied_lm.lm_head.weight.requires_grad
    # ... while freezing the head by name misses its weight: named_parameters()
    # yields the shared tensor only under its first name
    plain_freeze(tied_lm, "embed", flag=True)
    plain_freeze(tied_lm, "lm_head")
    assert tied_lm.lm_head.weight.requires_grad
    # and counting module by module, or by state dict, counts it twice
    unique = 252
    per_module = sum(p.numel() for m in tied_lm.children() for p in m.parameters())
    by_state_dict = sum(t.numel() for t in tied_lm.state_dict().values())
    assert per_module == by_state_dict == unique + tied_lm.embed.weight.numel()


def test_layerfreeze_handles_tied_weights(tied_lm, caplog):
    assert lf.freeze(tied_lm, "lm_head") == ["embed.weight", "lm_head.bias"]
    assert not tied_lm.lm_head.weight.requires_grad  # the head's weight is frozen as asked
    assert lf.count_parameters(tied_lm) == lf.ParamCount(trainable=72, frozen=180, total=252)
    lf.unfreeze(tied_lm)
    with caplog.at_level(logging.INFO, logger="layerfreeze"):
        lf.freeze(tied_lm, "embed")
    assert "embed.weight is shared with lm_head.weight: both change together" in caplog.text


# --------------------------------------------------------------------------- 5. typos


def test_trap_a_typo_freezes_nothing_silently(net):
    plain_freeze(net, "fc22")
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 73  # nothing frozen, no error


def test_layerfreeze_rejects_a_typo_and_suggests_the_name(net):
    with pytest.raises(lf.SelectorError, match=r"'fc22' matches nothing(.|\n)*closest names: 'fc2'"):
        lf.freeze(net, "fc22")
    with pytest.raises(lf.SelectorError, match=r"'fc22'"):
        lf.Schedule().freeze("fc22", until_epoch=4).frozen_at(net, epoch=1)
    assert lf.count_parameters(net).trainable == 73
