"""Eval holds: frozen BatchNorm statistics stay put across ``model.train()``,
the trap of plain PyTorch shown happening and then prevented."""

from __future__ import annotations

import torch

import layerfreeze as lf


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
