"""The seed experiment as a user would write it with layerfreeze.

A toy 10-3-3-3-3-1 net whose second layer (fc2) holds "pretrained" values is
trained for nine epochs; fc2 is frozen in epochs 1-3 and trains from epoch 4.
One schedule rule replaces the hand-written requires_grad loop, and the
Freezer keeps the optimizer in step (no parameter group is lost, no stale
gradient moves a frozen weight) and checks after every step that frozen
weights did not move.

Run: python examples/seed_toy.py   (`layerfreeze demo` shows the same run as tables)
"""

import torch
from torch import nn

import layerfreeze as lf
from layerfreeze.demos.seed import build

torch.set_printoptions(precision=4, sci_mode=False)
net, x, target = build(seed=0)  # the seed's net, with fc2 loaded from a "checkpoint"
pretrained = [p.detach().clone() for p in net.fc2.parameters()]

optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
fz = lf.Freezer(net, optimizer, lf.Schedule().freeze("fc2", until_epoch=4))

held_epochs, moved_epochs = [], []
for epoch in range(1, 10):
    for transition in fz.set_epoch(epoch):
        print(transition)
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(net(x), target)
    loss.backward()
    optimizer.step()  # the Freezer's guard verifies the frozen weights here

    unchanged = all(torch.equal(p, q) for p, q in zip(net.fc2.parameters(), pretrained, strict=True))
    (held_epochs if unchanged else moved_epochs).append(epoch)
    print("-" * 60)
    print(f"epoch {epoch}: trainable parameters {lf.count_parameters(net).trainable:,}, loss {loss.item():.4f}")
    print("fc2.weight", net.fc2.weight.detach())
    print("fc2.bias  ", net.fc2.bias.detach())

print("-" * 60)
print(f"fc2 was bitwise equal to its pretrained values after epochs {held_epochs}")
print(f"and differed from them after epochs {moved_epochs}")
