"""FSDP2 (``fully_shard``) with frozen and trainable parameters changed mid-run.

Each phase (fc2 frozen at shard time; fc2 unfrozen; fc1 frozen) trains a few
steps on the sharded model and on an unsharded copy fed the whole global
batch, then checks: frozen parameters got no gradient and did not move, and
the sharded result matches the unsharded one. Prints one JSON line (rank 0)
and exits non-zero on a failed check.

    python examples/fsdp2_check.py                       # 2 CPU processes, gloo
    torchrun --nproc_per_node=2 examples/fsdp2_check.py  # gloo
    torchrun --nproc_per_node=1 examples/fsdp2_check.py --backend nccl  # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import layerfreeze as lf


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _full(p: torch.Tensor) -> torch.Tensor:
    full = getattr(p, "full_tensor", None)
    return (full() if callable(full) else p).detach().clone()


def check(backend: str) -> dict[str, object]:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    mesh = init_device_mesh(device.type, (world,))
    torch.manual_seed(0)
    ref = Net().to(device)
    torch.manual_seed(0)
    net = Net().to(device)
    lf.freeze(ref, "fc2")
    lf.freeze(net, "fc2")  # frozen at shard time
    for layer in (net.fc1, net.fc2, net.fc3):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (net, ref))
    fz, ref_fz = lf.Freezer(net, opt), lf.Freezer(ref, ref_opt)
    phases, ok, step = [], True, 0
    for action, sel in (("start", ""), ("unfreeze", "fc2"), ("freeze", "fc1")):
        if action != "start":
            getattr(fz, action)(sel)
            getattr(ref_fz, action)(sel)
        frozen = sorted(n for n, p in net.named_parameters() if not p.requires_grad)
        before = {n: _full(p) for n, p in net.named_parameters()}
        no_grad: set[str] = set()
        for _ in range(3):
            batches = []
            for r in range(world):
                g = torch.Generator().manual_seed(1000 * r + step)
                x = torch.randn(8, 16, generator=g)
                batches.append((x.to(device), x.sum(dim=1, keepdim=True).sin().to(device)))
            opt.zero_grad()
            nn.functional.mse_loss(net(batches[rank][0]), batches[rank][1]).backward()
            no_grad = {n for n, p in net.named_parameters() if p.grad is None}
            opt.step()
            ref_opt.zero_grad()
            xs, ys = zip(*batches, strict=True)
            nn.functional.mse_loss(ref(torch.cat(xs)), torch.cat(ys)).backward()
            ref_opt.step()
            step += 1
        after = {n: _full(p) for n, p in net.named_parameters()}
        unchanged = sorted(n for n in after if torch.equal(after[n], before[n]))
        ref_params = {n: p.detach() for n, p in ref.named_parameters()}
        err = max(float((after[n] - ref_params[n]).abs().max()) for n in after)
        good = frozen == sorted(no_grad) == unchanged and err < 1e-4
        ok = ok and good
        phases.append({"phase": f"{action} {sel}".strip(), "frozen": frozen, "max_abs_err_vs_unsharded": err, "ok": good})
    return {
        "torch": torch.__version__,
        "backend": backend,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world,
        "phases": phases,
        "ok": ok,
    }


def _run(backend: str) -> bool:
    result = check(backend)
    if dist.get_rank() == 0:
        print(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return bool(result["ok"])


def _spawned(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ok = _run("gloo")
    sys.stdout.flush()
    os._exit(0 if ok else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group(args.backend)
        sys.exit(0 if _run(args.backend) else 1)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(port,), nprocs=2)


if __name__ == "__main__":
    main()
