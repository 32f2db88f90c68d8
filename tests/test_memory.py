import gc
import weakref

import torch
from torch import nn

import layerfreeze as lf

F32 = 4


def two_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 3))  # 220 and 63 parameters


def adam_step(net, opt):
    net(torch.randn(4, 10)).sum().backward()
    opt.step()


def test_figures_split_trainable_and_frozen():
    net = two_layers()
    lf.freeze(net, "[0]")
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.1)
    adam_step(net, opt)
    r = lf.memory_report(net, opt)
    assert (r.params_frozen, r.params_trainable) == (220 * F32, 63 * F32)
    assert (r.grads_frozen, r.grads_trainable) == (0, 63 * F32)
    # Adam: exp_avg and exp_avg_sq per element, plus one float32 step counter per tensor
    assert (r.optimizer_frozen, r.optimizer_trainable) == (0, 2 * 63 * F32 + 2 * F32)
    assert r.total == r.trainable + r.frozen == 283 * F32 + 63 * F32 + 2 * 63 * F32 + 2 * F32
    text = str(r)
    assert "optimizer state" in text and "total in memory" in text


def test_tied_weights_counted_once():
    emb = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert lf.memory_report(model).params_trainable == 50 * 8 * F32


def test_trap_plain_freeze_keeps_optimizer_state_release_state_frees_it():
    # plain PyTorch: requires_grad=False leaves the optimizer state in memory
    net = two_layers()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    adam_step(net, opt)
    for p in net[0].parameters():
        p.requires_grad_(False)
    assert lf.memory_report(net, opt).optimizer_frozen == 2 * 220 * F32 + 2 * F32

    # layerfreeze: release_state=True frees it (the tensors are gone, not just unlisted)
    net = two_layers()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    adam_step(net, opt)
    held = weakref.ref(opt.state[net[0].weight]["exp_avg"])
    fz = lf.Freezer(net, opt, release_state=True)
    fz.freeze("[0]")
    gc.collect()
    assert held() is None
    r = lf.memory_report(net, opt)
    assert r.optimizer_frozen == 0 and r.grads_frozen == 0
    assert r.optimizer_trainable == 2 * 63 * F32 + 2 * F32
    # unfreezing starts the state afresh and training goes on
    fz.unfreeze("[0]")
    adam_step(net, opt)
    assert lf.memory_report(net, opt).optimizer_trainable == 2 * 283 * F32 + 4 * F32


def test_without_release_state_the_state_is_kept_for_resuming():
    net = two_layers()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    adam_step(net, opt)
    lf.Freezer(net, opt).freeze("[0]")
    assert lf.memory_report(net, opt).optimizer_frozen == 2 * 220 * F32 + 2 * F32


def test_cached_features_are_reported():
    net = two_layers()
    lf.freeze(net, "[0]", mode="eval")
    net[0] = lf.cache(net[0])
    net(torch.randn(7, 10))
    r = lf.memory_report(net)
    assert r.cache_memory == net[0].stats().bytes_held >= 7 * 20 * F32
    assert r.total == r.trainable + r.frozen + r.cache_memory
