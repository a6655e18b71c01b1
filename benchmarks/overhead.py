r"""Wall-time overhead of Orbit Diffusion over a plain denoising step, measured in one process.

What is measured
----------------
One full training step = ``loss.corrupt`` (noise + regression target) + model forward + loss +
backward + Adam step, on the *same* batch, the same model instance and the same optimizer, for

* ``plain``: :class:`orbit_pyg.OrbitDiffusionLoss` with ``mode="plain"`` (no orbit);
* ``orbit``: the same loss with ``mode="orbit"`` (Rao-Blackwellized target over ``K`` candidates);
* ``orbit (guided)``: molecules only, the guided proposals (Kabsch-centred SO(3) and sequential
  species assignment) instead of uniform ones;
* ``orbit_exact``: the ``"exact"`` proposals, no samples of the continuous factor: the torus shift
  integrated per axis by quadrature (crystal; keys ``ratio_exact_crystal``), SO(3) integrated in closed
  form (matrix Fisher) for each of the same 50 species-permutation candidates (molecule;
  ``ratio_exact_molecule``).

The headline is ``ratio = time(orbit step) / time(plain step)``. The machine is shared and noisy,
so the variants are interleaved: every round runs ``plain, v_1, plain, v_2, ..., plain`` with the
orbit variants in a round-specific shuffled order; each variant step is divided by the mean of the
two ``plain`` steps around it, and the reported ratio is the median over rounds (absolute
milliseconds are medians as well; the ratio of the fastest steps is printed as a cross-check). The corrupt (target) part and the rest of the step
(model forward/backward/optimizer) are timed separately to show where the overhead comes from.

Two settings (sizes are fixed and stated; they are not tuned to hit any goal):

(a) **crystal** -- Perov-5-sized: 5 atoms per graph (ABX3 perovskites with jitter and a random
    global translation), batch 256, fractional coordinates in ``[0, 1)``; orbit = fractional
    translations on the 3-torus (the crystal integration's :class:`TorusTranslation`, uniform
    proposal: candidate 0 is the zero shift, ``K - 1 = 999`` uniform shifts), :class:`~orbit_pyg.WrappedNormalKernel`,
    ``VESchedule(0.005, 0.5)``, ``parameterization="score"``.
(b) **molecule** -- QM9-sized: batch 128, 7-9 heavy atoms (C, N, O, F) plus 3-16 H (about 18
    atoms per molecule), centred Gaussian-blob geometries; orbit =
    ``SpeciesPermutation(max_candidates=50) * SO3(num_candidates=200)`` (10,000 joint candidates
    per graph), Gaussian kernel, cosine ``VPSchedule``, ``parameterization="eps"``.

Denoiser (same for every variant of a setting): :class:`orbit_pyg.nn.PositionTransformer`,
hidden 128, 4 pre-norm encoder layers, 4 heads (0.58 M parameters), species from ``z``, float32
model, Adam(lr=1e-4).

Run::

    .venv/bin/python benchmarks/overhead.py            # full (about a minute on 2 idle cores; --budget caps it)
    .venv/bin/python benchmarks/overhead.py --quick    # under a minute
    .venv/bin/python benchmarks/overhead.py --profile  # also print torch.profiler tables of corrupt()
    .venv/bin/python benchmarks/overhead.py --threads 1  # contention-robust cross-check

``--threads`` defaults to all cores, as a training run would use. The script sets
``OMP_WAIT_POLICY=PASSIVE`` (unless already set): on a shared machine a spinning OpenMP thread whose
partner is descheduled stalls every op, and 2-thread steps were measured 10-20x slower without it.
Wall times still move with the neighbours' load, so the ``--threads 1`` run and the ``CPU ratio``
column (process CPU time, same interleaving) are the cross-checks; the load average is printed at
start and end. Quick mode skips the crystal ``chunk_size`` diagnostic variant. ``--budget`` caps the
seconds spent per setting (rounds stop early, after at least 3), so a loaded machine cannot stretch
the run.

The last printed line is one JSON object with the headline numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

# Set before torch loads its OpenMP runtime: idle worker threads sleep instead of spinning. On a
# shared machine a spinning thread whose partner is descheduled burns its time slice, and a 2-thread
# step was measured 10-20x slower than a 1-thread one without this (same with it: ~1x).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch_geometric.data import Batch, Data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orbit_pyg import (  # noqa: E402
    SO3,
    OrbitDiffusionLoss,
    SpeciesPermutation,
    VESchedule,
    VPSchedule,
    WrappedNormalKernel,
)
from orbit_pyg.nn import PositionTransformer  # noqa: E402
from orbit_pyg.integrations.crystal.orbits import TorusTranslation  # noqa: E402


# --- synthetic but realistic batches -----------------------------------------------------------
_A_SITES = [38, 56, 20, 57, 19, 11, 82, 39]  # Sr Ba Ca La K Na Pb Y
_B_SITES = [22, 40, 41, 73, 26, 25, 24, 28, 13, 31]  # Ti Zr Nb Ta Fe Mn Cr Ni Al Ga
_X_SITES = [8, 8, 8, 9, 7, 16]  # O (mostly), F, N, S
_PEROVSKITE = torch.tensor(
    [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]], dtype=torch.float64
)


def crystal_batch(num_graphs: int, gen: torch.Generator) -> Batch:
    """Perov-5-like ABX3 cells: ideal sites + 0.02 jitter + a random global shift, mod 1."""
    data = []
    for _ in range(num_graphs):
        a = _A_SITES[int(torch.randint(len(_A_SITES), (1,), generator=gen))]
        b = _B_SITES[int(torch.randint(len(_B_SITES), (1,), generator=gen))]
        x = _X_SITES[int(torch.randint(len(_X_SITES), (1,), generator=gen))]
        frac = _PEROVSKITE + 0.02 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
        frac = torch.remainder(frac + torch.rand(1, 3, generator=gen, dtype=torch.float64), 1.0)
        length = 3.6 + 0.6 * torch.rand(1, generator=gen, dtype=torch.float64)
        cell = (length * torch.eye(3, dtype=torch.float64)).unsqueeze(0)
        z = torch.tensor([a, b, x, x, x])
        data.append(Data(frac_coords=frac.float(), z=z, cell=cell.float(), num_nodes=5))
    return Batch.from_data_list(data)


def molecule_batch(num_graphs: int, gen: torch.Generator) -> Batch:
    """QM9-like molecules: 7-9 heavy atoms (C-rich, some N/O/F) + 3-16 H, ~1.5 A blob geometry."""
    heavy_species = torch.tensor([6, 7, 8, 9])
    heavy_probs = torch.tensor([0.72, 0.12, 0.13, 0.03])
    data = []
    for _ in range(num_graphs):
        n_heavy = int(torch.multinomial(torch.tensor([0.05, 0.15, 0.80]), 1, generator=gen)) + 7
        n_h = int(torch.randint(3, 17, (1,), generator=gen))
        heavy = heavy_species[torch.multinomial(heavy_probs, n_heavy, replacement=True, generator=gen)]
        z = torch.cat([heavy, torch.ones(n_h, dtype=torch.long)])
        pos = 1.5 * torch.randn(z.numel(), 3, generator=gen, dtype=torch.float64)
        pos = pos - pos.mean(0)
        data.append(Data(pos=pos.float(), z=z))
    return Batch.from_data_list(data)


# --- timing ------------------------------------------------------------------------------------
def _step(model, opt, loss_fn, batch, gen):
    """One training step; returns (corrupt s, rest-of-step s, whole step process-CPU s, mean ESS).

    The first two are wall clock; process CPU time sums all threads (user + system).
    """
    c0 = time.process_time()
    t0 = time.perf_counter()
    noisy = loss_fn.corrupt(batch, gen)
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    pred = model(noisy.xt, noisy.t, batch)
    loss = loss_fn.criterion(pred, noisy)
    loss.backward()
    opt.step()
    t2 = time.perf_counter()
    c1 = time.process_time()
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss in {loss_fn.mode} step")
    return t1 - t0, t2 - t1, c1 - c0, float(noisy.ess.mean())


def time_variants(model, batch, losses: dict, rounds: int, warmup: int, seed: int, budget_s: float = math.inf) -> dict:
    """Interleaved timing of ``plain`` and orbit variants on one model, optimizer and batch.

    Each round runs ``plain, v_1, plain, v_2, ..., plain`` (variants in a shuffled order) and the
    ratio of a variant is its time over the mean of the two ``plain`` steps around it, which
    cancels slow drifts of the machine's load. Reported: medians over rounds, the interquartile
    range of the ratios, and the ratio of the per-variant minima (the least-disturbed steps).
    Rounds stop early (after at least 3) once ``budget_s`` seconds have passed, so that a heavily
    loaded machine cannot stretch the run indefinitely; ``rounds_done`` says how many ran.
    """
    start = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    names = list(losses)
    variants = [n for n in names if n != "plain"]
    gens = {n: torch.Generator().manual_seed(seed + i) for i, n in enumerate(names)}
    order_gen = torch.Generator().manual_seed(seed + 1000)
    for _ in range(warmup):
        for n in names:
            _step(model, opt, losses[n], batch, gens[n])
    rec = {n: {k: [] for k in ("corrupt", "rest", "total", "cpu", "ess", "ratio", "cpu_ratio")} for n in names}

    def run(n):
        c, r, cpu, ess = _step(model, opt, losses[n], batch, gens[n])
        for key, val in (("corrupt", c), ("rest", r), ("total", c + r), ("cpu", cpu), ("ess", ess)):
            rec[n][key].append(val)
        return c + r, cpu

    done = 0
    for _ in range(rounds):
        if done >= 3 and time.perf_counter() - start > budget_s:
            break
        done += 1
        before = run("plain")
        for i in torch.randperm(len(variants), generator=order_gen).tolist():
            n = variants[i]
            t = run(n)
            after = run("plain")
            rec[n]["ratio"].append(t[0] / (0.5 * (before[0] + after[0])))
            rec[n]["cpu_ratio"].append(t[1] / (0.5 * (before[1] + after[1])))
            before = after
    out = {"rounds_done": done}
    for n in names:
        out[n] = {k: 1e3 * statistics.median(rec[n][k]) for k in ("corrupt", "rest", "total")}
        out[n]["min_total"] = 1e3 * min(rec[n]["total"])
        if losses[n].mode == "orbit":  # mean per-graph ESS over the timed steps (random times)
            out[n]["mean_ess"] = statistics.fmean(rec[n]["ess"])
        if n != "plain":
            out[n]["ratio"] = statistics.median(rec[n]["ratio"])
            out[n]["ratio_q25_q75"] = _quartiles(rec[n]["ratio"])
            out[n]["min_ratio"] = min(rec[n]["total"]) / min(rec["plain"]["total"])
            out[n]["cpu_ratio"] = statistics.median(rec[n]["cpu_ratio"])
    return out


def _quartiles(v):
    q = torch.quantile(torch.tensor(v, dtype=torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def profile_corrupt(name, loss_fn, batch, seed, rows=15):
    """torch.profiler table (self CPU time) of one `corrupt` call, after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    loss_fn.corrupt(batch, torch.Generator().manual_seed(seed))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss_fn.corrupt(batch, torch.Generator().manual_seed(seed))
    print(f"\n--- torch.profiler: {name}.corrupt (sorted by self CPU time) ---")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows))


def _loadavg() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- main --------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (whole script under a minute)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per setting (default 15, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--crystal-batch", type=int, default=256)
    ap.add_argument("--crystal-k", type=int, default=1000)
    ap.add_argument("--molecule-batch", type=int, default=128)
    ap.add_argument("--perm-k", type=int, default=50)
    ap.add_argument("--rot-k", type=int, default=200)
    ap.add_argument(
        "--crystal-diag-chunk", type=int, default=None,
        help="also time the crystal orbit step with this estimator chunk_size (diagnostic, not a headline; "
        "default 32, quick: skipped; 0: skip)",
    )
    ap.add_argument(
        "--budget", type=float, default=None,
        help="seconds per setting (warm-up included) after which rounds stop, once at least 3 have run "
        "(default 90, quick 15)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of the orbit corrupt()")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    budget = args.budget if args.budget is not None else (15.0 if args.quick else 90.0)
    if args.crystal_diag_chunk is None:
        args.crystal_diag_chunk = 0 if args.quick else 32
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    torch.set_num_threads(max(1, int(args.threads)))
    torch.manual_seed(args.seed)  # module init only; all data/noise use explicit generators

    load0 = _loadavg()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()} ({os.cpu_count()} cores), rounds {rounds}, "
        f"warmup {warmup}, load average {load0}"
    )

    # (a) crystals
    gen = torch.Generator().manual_seed(args.seed)
    cbatch = crystal_batch(args.crystal_batch, gen)
    torch.manual_seed(args.seed)
    cmodel = PositionTransformer(hidden=args.hidden, num_layers=args.layers, heads=4, species_key="z")
    sched_c = VESchedule(0.005, 0.5)
    kern = WrappedNormalKernel()
    common_c = dict(parameterization="score", kernel=kern, pos_key="frac_coords")
    closs = {
        "plain": OrbitDiffusionLoss(sched_c, mode="plain", **common_c),
        "orbit": OrbitDiffusionLoss(sched_c, TorusTranslation(args.crystal_k), mode="orbit", **common_c),
        "orbit_exact": OrbitDiffusionLoss(sched_c, TorusTranslation(proposal="exact"), mode="orbit", **common_c),
    }
    diag = f"orbit_chunk{args.crystal_diag_chunk}"
    if args.crystal_diag_chunk > 0:
        closs[diag] = OrbitDiffusionLoss(
            sched_c, TorusTranslation(args.crystal_k), mode="orbit", chunk_size=args.crystal_diag_chunk, **common_c
        )
    print(
        f"\n(a) crystal: {cbatch.num_graphs} graphs x 5 atoms = {cbatch.num_nodes} atoms, K = {args.crystal_k} torus "
        f"translations, WrappedNormal, VE(0.005, 0.5), score; model {cmodel} ({num_params(cmodel) / 1e6:.2f} M params)"
    )
    cres = time_variants(cmodel, cbatch, closs, rounds, warmup, args.seed, budget)

    # (b) molecules
    gen = torch.Generator().manual_seed(args.seed + 1)
    mbatch = molecule_batch(args.molecule_batch, gen)
    torch.manual_seed(args.seed)
    mmodel = PositionTransformer(hidden=args.hidden, num_layers=args.layers, heads=4, species_key="z")
    sched_m = VPSchedule("cosine")
    mloss = {
        "plain": OrbitDiffusionLoss(sched_m, mode="plain", parameterization="eps", center=True),
        "orbit": OrbitDiffusionLoss(
            sched_m, SpeciesPermutation("z", args.perm_k) * SO3(args.rot_k), mode="orbit", parameterization="eps"
        ),
        "orbit_guided": OrbitDiffusionLoss(
            sched_m,
            SpeciesPermutation("z", args.perm_k, proposal="guided") * SO3(args.rot_k, proposal="guided"),
            mode="orbit",
            parameterization="eps",
        ),
        "orbit_exact": OrbitDiffusionLoss(
            sched_m, SpeciesPermutation("z", args.perm_k) * SO3(proposal="exact"), mode="orbit", parameterization="eps"
        ),
    }
    print(
        f"(b) molecule: {mbatch.num_graphs} graphs, {mbatch.num_nodes} atoms ({mbatch.num_nodes / mbatch.num_graphs:.1f}/graph), "
        f"K = {args.perm_k} x {args.rot_k} = {args.perm_k * args.rot_k} joint candidates, Gaussian, VP cosine, eps; "
        f"model {mmodel} ({num_params(mmodel) / 1e6:.2f} M params)"
    )
    mres = time_variants(mmodel, mbatch, mloss, rounds, warmup, args.seed, budget)

    # table
    print(
        f"\nwall-clock ms per training step, medians over interleaved rounds "
        f"(crystal {cres['rounds_done']}, molecule {mres['rounds_done']} of {rounds})"
    )
    hdr = (
        f"{'setting':<10} {'variant':<15} {'corrupt':>9} {'model+opt':>10} {'total':>9} {'ratio':>7} "
        f"{'ratio IQR':>15} {'min ratio':>9} {'CPU ratio':>9} {'mean ESS':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    for setting, res in (("crystal", cres), ("molecule", mres)):
        for name, r in res.items():
            if name == "rounds_done":
                continue
            ratio = f"{r['ratio']:.3f}" if "ratio" in r else "1"
            iqr = "{:.3f}-{:.3f}".format(*r["ratio_q25_q75"]) if "ratio" in r else ""
            ess = f"{r['mean_ess']:.1f}" if "mean_ess" in r else ""
            mr = f"{r['min_ratio']:.3f}" if "min_ratio" in r else "1"
            cr = f"{r['cpu_ratio']:.3f}" if "cpu_ratio" in r else "1"
            print(
                f"{setting:<10} {name:<15} {r['corrupt']:>9.1f} {r['rest']:>10.1f} {r['total']:>9.1f} {ratio:>7} "
                f"{iqr:>15} {mr:>9} {cr:>9} {ess:>9}"
            )
    print("ratio: median over rounds of t(variant) / mean(t(plain) just before, just after); "
          "min ratio: fastest variant step / fastest plain step;\n"
          "CPU ratio: the same with process CPU time of all threads (least sensitive to other load with --threads 1)")
    print(f"load average at start {load0}, at end {_loadavg()} (the machine is shared)")
    goal = 1.10
    for key, val in (("crystal", cres["orbit"]["ratio"]), ("molecule", mres["orbit"]["ratio"]), ("molecule guided", mres["orbit_guided"]["ratio"]),
                     ("crystal exact", cres["orbit_exact"]["ratio"]), ("molecule exact", mres["orbit_exact"]["ratio"])):
        print(f"  {key:<16} ratio {val:.3f}  ({'meets' if val <= goal else 'misses'} the <= {goal} goal)")

    if args.profile:
        profile_corrupt("crystal orbit", closs["orbit"], cbatch, args.seed)
        profile_corrupt("molecule orbit", mloss["orbit"], mbatch, args.seed)
        profile_corrupt("molecule orbit_guided", mloss["orbit_guided"], mbatch, args.seed)
        profile_corrupt("crystal orbit_exact", closs["orbit_exact"], cbatch, args.seed)
        profile_corrupt("molecule orbit_exact", mloss["orbit_exact"], mbatch, args.seed)

    result = {
        "ratio_crystal": round(cres["orbit"]["ratio"], 4),
        "ratio_molecule": round(mres["orbit"]["ratio"], 4),
        "ratio_molecule_guided": round(mres["orbit_guided"]["ratio"], 4),
        "ratio_exact_crystal": round(cres["orbit_exact"]["ratio"], 4),
        "ratio_exact_molecule": round(mres["orbit_exact"]["ratio"], 4),
        "ms_crystal_orbit_exact": round(cres["orbit_exact"]["total"], 2),
        "ms_molecule_orbit_exact": round(mres["orbit_exact"]["total"], 2),
        "ms_crystal_orbit_exact_corrupt": round(cres["orbit_exact"]["corrupt"], 2),
        "ms_molecule_orbit_exact_corrupt": round(mres["orbit_exact"]["corrupt"], 2),
        "ms_crystal_plain": round(cres["plain"]["total"], 2),
        "ms_crystal_orbit": round(cres["orbit"]["total"], 2),
        "ms_molecule_plain": round(mres["plain"]["total"], 2),
        "ms_molecule_orbit": round(mres["orbit"]["total"], 2),
        "ms_molecule_orbit_guided": round(mres["orbit_guided"]["total"], 2),
        "ms_crystal_orbit_corrupt": round(cres["orbit"]["corrupt"], 2),
        "ms_molecule_orbit_corrupt": round(mres["orbit"]["corrupt"], 2),
        "ms_molecule_orbit_guided_corrupt": round(mres["orbit_guided"]["corrupt"], 2),
        "min_ratio_crystal": round(cres["orbit"]["min_ratio"], 4),
        "min_ratio_molecule": round(mres["orbit"]["min_ratio"], 4),
        "min_ratio_molecule_guided": round(mres["orbit_guided"]["min_ratio"], 4),
        "cpu_ratio_crystal": round(cres["orbit"]["cpu_ratio"], 4),
        "cpu_ratio_molecule": round(mres["orbit"]["cpu_ratio"], 4),
        "cpu_ratio_molecule_guided": round(mres["orbit_guided"]["cpu_ratio"], 4),
        "model": f"PositionTransformer(hidden={args.hidden}, layers={args.layers}, heads=4)",
        "params": num_params(mmodel),
        "crystal": {"batch": args.crystal_batch, "atoms_per_graph": 5, "K": args.crystal_k},
        "molecule": {"batch": args.molecule_batch, "atoms": int(mbatch.num_nodes), "K": args.perm_k * args.rot_k},
        "threads": torch.get_num_threads(),
        "loadavg_start": load0,
        "loadavg_end": _loadavg(),
        "rounds": [cres["rounds_done"], mres["rounds_done"]],
        "quick": bool(args.quick),
    }
    if diag in cres:
        result[f"ratio_crystal_{diag}"] = round(cres[diag]["ratio"], 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
