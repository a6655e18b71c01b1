r"""Throughput of the two ways to put Orbit Diffusion targets into a PyG pipeline.

What is measured
----------------
Graphs per second delivered to a training loop (noise + Rao-Blackwell target ready, batch collated),
no model step, for

* **per-sample** :class:`orbit_pyg.transforms.OrbitNoise` as the dataset's ``transform``, inside a
  ``torch_geometric.loader.DataLoader`` with ``num_workers`` = 0, 1 and 2 (``persistent_workers``
  when > 0, so worker start-up is paid once, before timing). Each worker process runs
  ``torch.set_num_threads(1)`` (``worker_init_fn``): every worker would otherwise start as many
  intra-op threads as there are cores, and ``W`` workers x ``cores`` threads oversubscribe the CPU
  for tensors this small. The main process runs with ``--threads`` threads (default 1) for
  ``num_workers=0``.
* **batched** :class:`orbit_pyg.transforms.BatchedOrbitNoise` applied in the main process to each
  batch that a plain ``DataLoader(num_workers=0)`` collates (the same graphs, no transform), with
  ``--threads`` intra-op threads (default 1: the headline ``batched_gps``, so one core against the
  per-sample pipeline's up to two worker cores), and with one thread per core (``batched_all_cores``,
  reported alongside; on a shared, oversubscribed machine extra OpenMP threads often *slow* it).

Two settings, ``K = 1000`` candidates per graph:

(a) **crystal** -- 5 atoms, random fractional coordinates in ``[0, 1)``, batch 256;
    ``TorusTranslation(1000)`` (uniform shifts, identity included),
    :class:`~orbit_pyg.WrappedNormalKernel`, ``VESchedule(0.005, 0.5)`` (DiffCSP), ``score``
    parameterization on ``frac_coords``.
(b) **molecule** -- QM9-sized: 7-9 heavy atoms from {C, N, O} plus hydrogens, 16-20 atoms (18 on
    average), Gaussian-blob positions, batch 128;
    ``SpeciesPermutation(max_candidates=5) * SO3(200)`` (at most 5 x 200 = 1000 joint candidates;
    the hydrogen groups are far larger than 5, so 5 permutations are sampled), Gaussian kernel,
    cosine ``VPSchedule``, ``eps`` parameterization.

Timing: the machine is shared and noisy, so all variants are measured in one process in
interleaved rounds (a fresh random order of the variants each round); each measurement is one
epoch of ``--batches`` batches and the table reports the median graphs/s over rounds (and the best
round). Worker pools are started (one untimed epoch) before the first round. The headline ``speedup_batched_vs_best_per_sample`` is ``batched_gps`` divided by the best
of the per-sample worker counts, per setting.

Run::

    .venv/bin/python benchmarks/transform_throughput.py --quick     # under a minute
    .venv/bin/python benchmarks/transform_throughput.py             # more rounds and batches
    .venv/bin/python benchmarks/transform_throughput.py --profile   # + torch.profiler tables

The last printed line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orbit_pyg.data import ListDataset
from orbit_pyg import SO3, SpeciesPermutation, VESchedule, VPSchedule, WrappedNormalKernel  # noqa: E402
from orbit_pyg.integrations.crystal.orbits import TorusTranslation  # noqa: E402
from orbit_pyg.transforms import BatchedOrbitNoise, OrbitNoise  # noqa: E402

WORKERS = (0, 1, 2)



def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def crystals(n: int, seed: int) -> list[Data]:
    g = torch.Generator().manual_seed(seed)
    z = torch.tensor([38, 22, 8, 8, 8])
    cell = 4.0 * torch.eye(3).unsqueeze(0)
    return [Data(frac_coords=torch.rand(5, 3, generator=g), atom_types=z, cell=cell, num_nodes=5) for _ in range(n)]


def molecules(n: int, seed: int) -> list[Data]:
    g = torch.Generator().manual_seed(seed)
    heavy_species = torch.tensor([6, 7, 8])
    out = []
    for _ in range(n):
        heavy = int(torch.randint(7, 10, (1,), generator=g))
        total = int(torch.randint(16, 21, (1,), generator=g))
        z = torch.cat([heavy_species[torch.randint(0, 3, (heavy,), generator=g)], torch.ones(total - heavy, dtype=torch.long)])
        out.append(Data(pos=1.5 * torch.randn(total, 3, generator=g), z=z))
    return out


def settings():
    crystal_kw = dict(kernel=WrappedNormalKernel(), parameterization="score", pos_key="frac_coords")
    return {
        "crystal": dict(
            batch_size=256, data=crystals,
            noise=lambda cls: cls(VESchedule(0.005, 0.5), TorusTranslation(1000), mode="orbit", **crystal_kw),
            describe="5 atoms, TorusTranslation(1000), wrapped normal, score, batch 256",
        ),
        "molecule": dict(
            batch_size=128, data=molecules,
            noise=lambda cls: cls(VPSchedule("cosine"), SpeciesPermutation(max_candidates=5) * SO3(200), mode="orbit", parameterization="eps"),
            describe="16-20 atoms {H,C,N,O}, SpeciesPermutation(5) x SO3(200), Gaussian, eps, batch 128",
        ),
    }


def make_variants(name: str, cfg: dict, batches: int, threads: int):
    """``label -> (run_epoch, threads)``; ``run_epoch()`` returns the number of graphs delivered."""
    items = cfg["data"](cfg["batch_size"] * batches, seed=0)
    per_sample = cfg["noise"](OrbitNoise)
    batched = cfg["noise"](BatchedOrbitNoise)
    variants = {}
    for w in WORKERS:
        loader = DataLoader(ListDataset(items, per_sample), batch_size=cfg["batch_size"], shuffle=False, num_workers=w,
                            persistent_workers=w > 0, worker_init_fn=_worker_init if w > 0 else None)
        variants[f"per_sample_w{w}"] = (_epoch(loader, None), 1 if w > 0 else threads, w > 0)
    plain_loader = DataLoader(ListDataset(items), batch_size=cfg["batch_size"], shuffle=False, num_workers=0)
    variants["batched"] = (_epoch(plain_loader, batched), threads, False)
    cores = os.cpu_count() or 1
    if cores != threads:
        variants["batched_all_cores"] = (_epoch(plain_loader, batched), cores, False)
    per_sample(items[0]), batched(Batch.from_data_list(items[:2]))  # first-call overheads, untimed
    return variants


def _epoch(loader, transform):
    def run() -> int:
        graphs = 0
        for batch in loader:
            if transform is not None:
                batch = transform(batch)
            assert batch.target.shape[0] == batch.num_nodes
            graphs += batch.num_graphs
        return graphs

    return run


def measure(variants: dict, rounds: int, seed: int = 0) -> dict[str, list[float]]:
    """Interleaved rounds: every round runs every variant once, in a fresh random order."""
    rng = random.Random(seed)
    labels = list(variants)
    for label in labels:  # start the persistent worker pools (one untimed epoch)
        fn, threads, has_workers = variants[label]
        if has_workers:
            fn()
    gps = {label: [] for label in labels}
    for _ in range(rounds):
        rng.shuffle(labels)
        for label in labels:
            fn, threads, _ = variants[label]
            torch.set_num_threads(threads)
            start = time.perf_counter()
            graphs = fn()
            gps[label].append(graphs / (time.perf_counter() - start))
    return gps


def profile_transforms(cfg: dict, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    items = cfg["data"](cfg["batch_size"], seed=1)
    per_sample, batched = cfg["noise"](OrbitNoise), cfg["noise"](BatchedOrbitNoise)
    batch = Batch.from_data_list(items)
    torch.set_num_threads(1)
    per_sample(items[0]), batched(batch)
    for label, fn in (("per-sample OrbitNoise x batch", lambda: [per_sample(d) for d in items]), ("BatchedOrbitNoise", lambda: batched(batch))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n-- profile: {label} ({len(items)} graphs, 1 thread)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and batches (under a minute)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    ap.add_argument("--batches", type=int, default=None, help="batches per epoch (default 6, quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the main process (default 1)")
    ap.add_argument("--settings", nargs="+", default=["crystal", "molecule"], choices=["crystal", "molecule"])
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of both transforms")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    batches = args.batches or (2 if args.quick else 6)
    threads = max(1, int(args.threads))
    torch.manual_seed(0)
    cfgs = settings()
    print(f"transform throughput: {os.cpu_count()} cores, torch {torch.__version__}, main threads {threads}, "
          f"worker threads 1, {rounds} rounds x {batches} batches per epoch")

    result = {"per_sample_gps": {}, "batched_gps": {}, "batched_all_cores_gps": {}, "speedup_batched_vs_best_per_sample": {}}
    table = []
    for name in args.settings:
        cfg = cfgs[name]
        t0 = time.perf_counter()
        gps = measure(make_variants(name, cfg, batches, threads), rounds)
        med = {k: statistics.median(v) for k, v in gps.items()}
        best = {k: max(v) for k, v in gps.items()}
        result["per_sample_gps"][name] = {str(w): round(med[f"per_sample_w{w}"], 1) for w in WORKERS}
        result["batched_gps"][name] = round(med["batched"], 1)
        if "batched_all_cores" in med:
            result["batched_all_cores_gps"][name] = round(med["batched_all_cores"], 1)
        best_per_sample = max(med[f"per_sample_w{w}"] for w in WORKERS)
        result["speedup_batched_vs_best_per_sample"][name] = round(med["batched"] / best_per_sample, 2)
        for label in gps:
            table.append((name, label, med[label], best[label], med[label] / best_per_sample))
        print(f"  {name}: {cfg['describe']} ({time.perf_counter() - t0:.1f} s)")

    print(f"\n{'setting':<10} {'variant':<18} {'threads':>7} {'graphs/s (median)':>18} {'best round':>11} {'vs best per-sample':>19}")
    for name, label, m, b, rel in table:
        th = {"batched_all_cores": os.cpu_count(), "batched": threads, "per_sample_w0": threads}.get(label, "1/wkr")
        print(f"{name:<10} {label:<18} {th!s:>7} {m:>18.1f} {b:>11.1f} {rel:>18.2f}x")
    if args.profile:
        for name in args.settings:
            profile_transforms(cfgs[name], rows=12)
    result.update(rounds=rounds, batches_per_epoch=batches, main_threads=threads, worker_threads=1,
                  cores=os.cpu_count(), candidates=1000, batch_size={n: cfgs[n]["batch_size"] for n in args.settings})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
