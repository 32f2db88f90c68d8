"""Freeze and unfreeze under DistributedDataParallel, ranks kept identical.

Run with torchrun (any number of processes; gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py
    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --backend nccl

or plainly (``python examples/ddp_torchrun.py``), which starts 2 CPU
processes itself. fc2 is frozen for epochs 0-1 and trains from epoch 2; fc1 is
frozen from epoch 3. After every epoch the ranks compare their parameters
bitwise.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import layerfreeze as lf


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def train(backend: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    net = Net().to(device)
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    schedule = lf.Schedule().freeze("fc2", until_epoch=2).freeze("fc1", from_epoch=3)
    fz = lf.Freezer(ddp, opt, schedule)  # names of the inner model: "fc2", not "module.fc2"
    g = torch.Generator().manual_seed(rank)  # each rank its own data
    for epoch in range(5):
        for t in fz.set_epoch(epoch):
            if rank == 0:
                print(t)
        for _ in range(10):
            x = torch.randn(32, 16, generator=g).to(device)
            y = x.sum(dim=1, keepdim=True).sin()
            opt.zero_grad()
            loss = nn.functional.mse_loss(ddp(x), y)  # the same DDP object throughout
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        same = all(torch.equal(gathered[0], t) for t in gathered[1:])
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}, trainable {lf.count_parameters(net).trainable:,}, "
                  f"ranks bitwise identical: {same}")
        if not same:
            raise SystemExit("ranks diverged")


def _spawned(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    train("gloo")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group(args.backend)
        train(args.backend)
        dist.barrier()
        dist.destroy_process_group()
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(port,), nprocs=2)


if __name__ == "__main__":
    main()
