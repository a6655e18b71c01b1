"""Helper process for tests/test_training.py: a tiny training run (not a test module).

Launched as ``python tests/_train_worker.py ...`` (one process) or under
``torchrun --standalone --nproc_per_node 2 tests/_train_worker.py ...`` (DDP, gloo on CPU). The
test process imports :func:`build` to make the identical run in-process.

``--kill-at-save K`` makes the process SIGKILL itself in the middle of writing the checkpoint of
step ``K`` (half of the bytes are in the temporary file): a real crash mid-save.
"""
from __future__ import annotations

import argparse
import faulthandler
import io
import json
import os
import signal
import sys

import torch
from torch import nn
from torch_geometric.data import Data

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orbit_pyg import SO3, OrbitDiffusionLoss, VPSchedule  # noqa: E402
from orbit_pyg.nn import PositionTransformer  # noqa: E402
from orbit_pyg.training import Trainer  # noqa: E402


def make_dataset(n: int = 24, seed: int = 0) -> list[Data]:
    """Ragged graphs (2..6 nodes) with species ``z`` and a smooth per-node regression target ``y``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = 2 + (i * 7) % 5
        pos = torch.randn(k, 3, generator=g)
        z = torch.randint(1, 9, (k,), generator=g)
        out.append(Data(pos=pos, z=z, y=torch.sin(2.0 * pos) + 0.1 * pos.sum(-1, keepdim=True)))
    return out


class NodeMLP(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, pos):
        return self.net(pos)


def regression_loss(model, batch, generator):
    """Deterministic given the batch: mean over nodes of the squared error (plus a logged MAE)."""
    err = model(batch.pos) - batch.y
    return (err ** 2).sum(-1).mean(), {"mae": err.abs().mean()}


def build(kind: str, out_dir, steps: int, batch_size: int = 5, checkpoint_every: int = 4, seed: int = 0,
          lr: float = 1e-2) -> Trainer:
    """The run used by the tests; model initialization is seeded here, so it is identical everywhere."""
    torch.manual_seed(1234)
    data = make_dataset()
    if kind == "regression":
        model, loss = NodeMLP(), regression_loss
        scheduler = None
    elif kind == "orbit":
        model = PositionTransformer(hidden=16, num_layers=1, heads=2)
        loss = OrbitDiffusionLoss(VPSchedule("cosine"), orbit=SO3(16), mode="orbit", parameterization="eps")
        scheduler = "cosine"
    else:
        raise ValueError(kind)
    return Trainer(model, loss, data, batch_size=batch_size, lr=lr, max_steps=steps, log_every=1,
                   checkpoint_every=checkpoint_every, val_every=3, val_fn=lambda m: {"val_loss": float(sum(p.abs().sum() for p in m.parameters()))},
                   out_dir=out_dir, seed=seed, scheduler=scheduler, warmup_steps=2 if scheduler else 0,
                   grad_clip=1.0, ema_decay=0.9, device="cpu", progress=False)


def install_kill_at_save(step: int) -> None:
    """Make the checkpoint of ``step`` die (SIGKILL) with half of its bytes written."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == step and hasattr(f, "write"):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loss", default="regression", choices=["regression", "orbit"])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--checkpoint-every", type=int, default=4)
    p.add_argument("--kill-at-save", type=int, default=None)
    p.add_argument("--watchdog", type=float, default=120.0, help="dump stacks and exit after this many seconds")
    args = p.parse_args()
    faulthandler.dump_traceback_later(args.watchdog, exit=True)  # a hung collective never outlives the test
    torch.set_num_threads(1)
    if args.kill_at_save is not None:
        install_kill_at_save(args.kill_at_save)
    trainer = build(args.loss, args.out, args.steps, args.batch_size, args.checkpoint_every)
    history = trainer.fit()
    report = {
        "rank": trainer.rank, "world_size": trainer.world_size,
        "losses": [r["loss"] for r in history if r["kind"] == "train"],
        "params": [p.detach().flatten().tolist() for p in trainer.model.parameters()],
    }
    with open(os.path.join(args.out, f"worker_rank{trainer.rank}.json"), "w") as f:
        json.dump(report, f)
    trainer.close()


if __name__ == "__main__":
    main()
