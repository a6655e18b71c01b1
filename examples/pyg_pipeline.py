"""Door 1: an existing PyG denoising pipeline adopts Orbit Diffusion by adding one transform.

The model is PyG's own ``torch_geometric.nn.models.GAT`` (GATv2 layers) on the fully connected
graph of each molecule, reading raw noisy coordinates (so it is not rotation-equivariant) and
predicting one 3-vector per atom: a typical augmentation-era denoiser. Molecules: ASE's G2 set.

The whole migration (see README, "Adopting Orbit Diffusion in a PyG pipeline"):

* the dataset's transform gains ``OrbitNoise(schedule, orbit, mode="orbit")``;
* the loop feeds ``batch.xt`` / ``batch.t`` to the model and regresses onto ``batch.target``
  instead of drawing noise itself.

``--mode plain`` runs the original pipeline (noise drawn in the loop), ``augment`` adds a random
rotation / relabelling per molecule, ``orbit`` uses the Rao-Blackwell target; ``all`` runs the three
and prints train / validation losses side by side. Validation uses one metric for every mode:
eps-MSE on randomly rotated held-out molecules.

Run: ``python examples/pyg_pipeline.py`` (about a minute on 2 cores) or ``--quick``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn.models import GAT
from torch_geometric.transforms import BaseTransform, Compose

from orbit_pyg import SO3, OrbitDiffusionLoss, SpeciesPermutation, VPSchedule
from orbit_pyg.data import ListDataset
from orbit_pyg.nn import time_embedding
from orbit_pyg.transforms import CenterPositions, OrbitNoise

from g2_molecules import load_g2, split

SCHEDULE = VPSchedule("cosine", num_steps=1000)


class FullyConnected(BaseTransform):
    """All ordered pairs of distinct atoms as edges."""

    def forward(self, data: Data) -> Data:
        n = data.num_nodes
        idx = torch.arange(n)
        src, dst = idx.repeat_interleave(n), idx.repeat(n)
        keep = src != dst
        data.edge_index = torch.stack([src[keep], dst[keep]])
        return data


class Denoiser(torch.nn.Module):
    """PyG's GAT over ``[x_t, species embedding, time embedding]`` with edge distances; 3 outputs per atom."""

    def __init__(self, hidden: int = 64, layers: int = 3):
        super().__init__()
        self.species = torch.nn.Embedding(100, 16)
        self.gnn = GAT(3 + 16 + 16, hidden, layers, out_channels=3, v2=True, edge_dim=1, heads=4)

    def forward(self, xt, t, batch):
        src, dst = batch.edge_index
        dist = (xt[src] - xt[dst]).norm(dim=-1, keepdim=True)
        h = torch.cat([xt, self.species(batch.z), time_embedding(t, 16)[batch.batch]], dim=-1)
        return self.gnn(h, batch.edge_index, edge_attr=dist)



def orbit():
    return SpeciesPermutation(max_candidates=50) * SO3(num_candidates=200, proposal="guided")


def train(mode: str, train_items, val: Batch, epochs: int, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    if mode == "plain":  # the original pipeline: noise drawn inside the loop
        transform = Compose([CenterPositions()])
    else:  # the migration: one transform
        transform = Compose([CenterPositions(), OrbitNoise(SCHEDULE, orbit(), mode=mode)])
    loader = DataLoader(ListDataset(train_items, transform), batch_size=8, shuffle=True)
    history = []
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for batch in loader:
            if mode == "plain":
                t = SCHEDULE.sample_time(batch.num_graphs)
                a, s = SCHEDULE.alpha(t)[batch.batch, None].float(), SCHEDULE.sigma(t)[batch.batch, None].float()
                eps = torch.randn_like(batch.pos)
                pred = model(a * batch.pos + s * eps, t, batch)
                loss = ((pred - eps) ** 2).sum(-1).mean()
            else:
                pred = model(batch.xt, batch.t, batch)
                loss = ((pred - batch.target) ** 2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + loss.item(), count + 1
        history.append({"epoch": epoch, "train": total / count, "val": validation_loss(model, val)})
    return history


@torch.no_grad()
def validation_loss(model, val: Batch, seed: int = 123) -> float:
    """eps-MSE on randomly rotated / relabelled held-out molecules at 8 fixed times."""
    loss = OrbitDiffusionLoss(SCHEDULE, orbit(), mode="augment", center=True)
    g = torch.Generator().manual_seed(seed)
    vals = []
    for t in torch.linspace(0.05, 0.95, 8):
        noisy = loss.corrupt(val, g, t=torch.full((val.num_graphs,), float(t), dtype=torch.float64))
        vals.append(float(loss.criterion(model(noisy.xt, noisy.t, val), noisy)))
    return sum(vals) / len(vals)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="all", choices=["plain", "augment", "orbit", "all"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    epochs = args.epochs or (1 if args.quick else 30)
    data = [FullyConnected()(d) for d in load_g2()]
    train_items, val_items = split(data)
    val = Batch.from_data_list([CenterPositions()(d.clone()) for d in val_items])
    modes = ["plain", "augment", "orbit"] if args.mode == "all" else [args.mode]
    results = {}
    for mode in modes:
        t0 = time.time()
        results[mode] = train(mode, train_items, val, epochs)
        print(f"{mode:8s} ({time.time() - t0:5.1f} s)  " + "  ".join(
            f"ep{h['epoch']}: train {h['train']:.3f} val {h['val']:.3f}" for h in results[mode][-3:]))
    summary = {"val": {m: h[-1]["val"] for m, h in results.items()}, "train": {m: h[-1]["train"] for m, h in results.items()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
