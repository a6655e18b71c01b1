r"""Estimator health across noise levels: ESS of the SO(3) proposals and gradient variance of the
Orbit Diffusion target against data augmentation.

What is measured
----------------
A fixed batch of real small organic molecules (ASE's G2 set, 7-14 atoms each, centred, Angstrom)
is noised with the cosine :class:`~orbit_pyg.VPSchedule` at a **fixed** time per noise level. The
time grid is chosen so that the effective noise scale ``sigma_t / alpha_t`` (reported as
``sigmas``) is log-spaced from ``1e-3`` to ``10`` (in Angstrom: from far below bond-length
precision to far beyond molecule size). At each level:

(i)  **ESS.** Mean per-graph effective sample size ``1 / sum_k w_k^2`` of the orbit weights, SO(3)
     with ``K`` candidates, uniform (Haar) proposal vs guided (Kabsch-centred mixture) proposal,
     averaged over ``--ess-draws`` independent corruptions (keys ``ess_uniform``, ``ess_guided``).
(ii) **Gradient variance.** :func:`orbit_pyg.diagnostics.gradient_variance` of a fixed, small,
     non-equivariant :class:`~orbit_pyg.nn.PositionTransformer` (hidden 32, 2 layers, 4 heads,
     at its seeded initialization) under four losses, all at the same fixed time: ``plain`` (no
     symmetry), ``augment`` (one Haar rotation per graph), ``orbit`` with the uniform proposal and
     ``orbit`` with the guided proposal (``K`` candidates each). ``trace Cov[grad]`` is estimated
     from ``--draws`` gradient draws (fresh noise, rotation and candidates per draw).
     ``grad_var_ratio = Var(orbit uniform) / Var(augment)``; ``grad_var_ratio_guided`` likewise.
     A fifth loss, ``orbit_exact``, uses ``SO3(proposal="exact")``: the SO(3) average in closed form
     (matrix Fisher mean, no samples; its ESS is 1 by construction and is not reported):
     ``grad_var_ratio_exact = Var(exact) / Var(augment)``, and against the sampled estimators at the
     same ``K``: ``exact_vs_uniform = Var(exact) / Var(orbit uniform)``, ``exact_vs_guided`` likewise.
(iii) **Cost.** Median wall time of one ``corrupt`` call (noise + target, no model) per loss at the
     middle noise level (``corrupt_ms``), to compare estimators at equal wall time.
(iv) **Crystals** (``--crystal-levels``, key ``crystal``): the same gradient-variance measurement for
     fractional coordinates on the torus: 8 Perov-5-like ABX3 cells (ideal sites + 0.02 jitter, a
     random global shift), wrapped-normal kernel, ``VESchedule(0.005, 0.5)``, score target, the same
     small ``PositionTransformer``; losses ``augment`` (one uniform shift), ``orbit`` with ``K``
     uniform translations (``--crystal-k``, default 1000, the paper's) and ``orbit_exact``
     (``TorusTranslation(proposal="exact")``); sigma log-spaced over the DiffCSP range.
     ``augment`` and ``orbit`` have the same expected gradient, so a ratio below 1 is a pure
     variance reduction (Rao-Blackwell); ``plain`` is shown for scale only (different objective).

A log-log plot of gradient variance (and ESS) vs ``sigma / alpha`` is written to ``--plot``.

Run::

    .venv/bin/python benchmarks/variance.py            # full: 9 levels, 256 draws (about a minute)
    .venv/bin/python benchmarks/variance.py --quick    # 5 levels, 24 draws (under a minute)
    .venv/bin/python benchmarks/variance.py --k 1000   # sampled estimators at the paper's K

It runs single-threaded by default (``--threads``): the workload is thousands of tiny forward /
backward passes, which a second thread does not speed up and which a shared machine slows down
badly when one of the threads is descheduled. The numbers it reports are not timings anyway.

The last printed line is one JSON object with the headline numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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

from orbit_pyg import SO3, OrbitDiffusionLoss, VESchedule, VPSchedule, WrappedNormalKernel  # noqa: E402
from orbit_pyg.integrations.crystal.orbits import TorusTranslation  # noqa: E402
from orbit_pyg.diagnostics import gradient_variance  # noqa: E402
from orbit_pyg.io import atomic_open  # noqa: E402
from orbit_pyg.nn import PositionTransformer  # noqa: E402

#: real geometries from ase.collections.g2 (H, C, N, O only; 7-14 atoms), in a fixed order.
G2_MOLECULES = [
    "CH3CH2OH", "C6H6", "CH3COOH", "C4H4NH", "C5H5N", "CH3CONH2", "C4H4O", "CH3COCH3",
    "isobutane", "trans-butane", "CH3CH2NH2", "HCOOCH3", "cyclobutane", "C3H8", "CH3NO2", "C2H6CHOH",
]


def g2_batch(num_molecules: int) -> tuple[Batch, list[str]]:
    """The first ``num_molecules`` of :data:`G2_MOLECULES`, centred, as one PyG batch (float32)."""
    from ase.collections import g2

    if not 1 <= num_molecules <= len(G2_MOLECULES):
        raise ValueError(f"--molecules must lie in [1, {len(G2_MOLECULES)}], got {num_molecules}")
    names = G2_MOLECULES[:num_molecules]
    data = []
    for name in names:
        atoms = g2[name]
        pos = torch.tensor(atoms.get_positions(), dtype=torch.float64)
        pos = pos - pos.mean(0)
        data.append(Data(pos=pos.float(), z=torch.tensor(atoms.get_atomic_numbers(), dtype=torch.long)))
    return Batch.from_data_list(data), names


def times_for_noise_ratios(schedule: VPSchedule, ratios: torch.Tensor) -> torch.Tensor:
    """Times ``t`` with ``sigma(t) / alpha(t) = ratio`` (monotone in ``t``; dense grid + log interpolation)."""
    grid = torch.linspace(0.0, 1.0, 200_001, dtype=torch.float64)[1:]
    r = schedule.sigma(grid) / schedule.alpha(grid)
    log_r, log_q = torch.log(r), torch.log(ratios.to(torch.float64))
    if bool((log_q < log_r[0]).any() | (log_q > log_r[-1]).any()):
        raise ValueError(f"noise ratios must lie in [{float(r[0]):.2e}, {float(r[-1]):.2e}] for this schedule")
    idx = torch.searchsorted(log_r, log_q).clamp(1, grid.numel() - 1)
    lo, hi = idx - 1, idx
    frac = (log_q - log_r[lo]) / (log_r[hi] - log_r[lo])
    return grid[lo] + frac * (grid[hi] - grid[lo])


def fixed_time_loss(loss: OrbitDiffusionLoss, t: torch.Tensor):
    """``loss_fn(model, data, generator)`` for :func:`gradient_variance`, with the time held at ``t``."""

    def loss_fn(model, data, generator):
        # Common random numbers: each draw takes one seed from the outer generator and corrupts
        # with a fresh generator from it, so draw i of `augment` and of `orbit` (same outer seed)
        # share the rotation h and the noise eps; only the orbit candidates differ. Each variance
        # stays an unbiased estimate; their ratio becomes far less noisy.
        draw = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        noisy = loss.corrupt(data, draw, t=t)
        return loss.criterion(model(noisy.xt, noisy.t, data), noisy)

    return loss_fn


def _resampled_variances(g: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Unbiased ``trace Cov`` of the rows of ``g [D, P]`` for each resample given by ``counts [R, D]``.

    With ``c`` the multiplicities of a resample, ``sum_j c_j ||g_j - m||^2 = c·diag(G) - cᵀGc / D`` for
    the Gram matrix ``G = g gᵀ`` (rows centred first, which leaves variances unchanged), so all
    resamples cost ``O(R D^2)`` after one ``D x D`` product.
    """
    d = g.size(0)
    g = g - g.mean(0, keepdim=True)
    gram = g @ g.t()
    quad = ((counts @ gram) * counts).sum(1)
    return (counts @ gram.diagonal() - quad / d) / (d - 1)


def paired_bootstrap_ci(num: torch.Tensor, den: torch.Tensor, reps: int, gen: torch.Generator, level: float = 0.9):
    """Percentile bootstrap interval of ``Var(num) / Var(den)``, resampling draws jointly (they are paired)."""
    d = num.size(0)
    idx = torch.randint(0, d, (reps, d), generator=gen)
    counts = torch.zeros(reps, d, dtype=torch.float64).scatter_add_(1, idx, torch.ones(reps, d, dtype=torch.float64))
    ratios = _resampled_variances(num.to(torch.float64), counts) / _resampled_variances(den.to(torch.float64), counts)
    q = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def mean_ess(loss: OrbitDiffusionLoss, data, t: torch.Tensor, draws: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return float(torch.stack([loss.corrupt(data, gen, t=t).ess.mean() for _ in range(draws)]).mean())


_PEROVSKITE = torch.tensor(
    [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]], dtype=torch.float64
)


def perovskite_batch(num_graphs: int, seed: int) -> Batch:
    """ABX3 cells in fractional coordinates: ideal sites + 0.02 jitter + a random global shift, mod 1."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(num_graphs):
        frac = _PEROVSKITE + 0.02 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
        frac = torch.remainder(frac + torch.rand(1, 3, generator=gen, dtype=torch.float64), 1.0)
        data.append(Data(frac_coords=frac.float(), z=torch.tensor([38, 22, 8, 8, 8]), num_nodes=5))
    return Batch.from_data_list(data)


def crystal_section(args, draws: int, levels: int) -> dict:
    """Gradient variance of augment / sampled orbit / exact orbit on the torus (see module docstring, iv)."""
    data = perovskite_batch(8, args.seed)
    sched = VESchedule(0.005, 0.5)
    common = dict(parameterization="score", kernel=WrappedNormalKernel(), pos_key="frac_coords")
    losses = {
        "augment": OrbitDiffusionLoss(sched, TorusTranslation(args.crystal_k), mode="augment", **common),
        "orbit_uniform": OrbitDiffusionLoss(sched, TorusTranslation(args.crystal_k), mode="orbit", **common),
        "orbit_exact": OrbitDiffusionLoss(sched, TorusTranslation(proposal="exact"), mode="orbit", **common),
    }
    torch.manual_seed(args.seed)
    model = PositionTransformer(hidden=args.hidden, num_layers=args.layers, heads=4, species_key="z")
    sigmas = torch.logspace(math.log10(0.005), math.log10(0.5), levels, dtype=torch.float64)
    times = (torch.log(sigmas / 0.005) / math.log(0.5 / 0.005)).clamp(0.0, 1.0)
    rows = []
    for i, (sig, t_val) in enumerate(zip(sigmas.tolist(), times.tolist())):
        t = torch.full((data.num_graphs,), t_val, dtype=torch.float64)
        seed = args.seed + 5000 + 1000 * i
        row, grads = {"sigma": sig}, {}
        for name, loss in losses.items():
            out = gradient_variance(fixed_time_loss(loss, t), model, data, num_draws=draws, seed=seed)
            row[name], grads[name] = out["total_variance"], out["grads"]
        boot = torch.Generator().manual_seed(seed + 7)
        row["uniform_ci"] = paired_bootstrap_ci(grads["orbit_uniform"], grads["augment"], args.bootstrap, boot)
        row["exact_ci"] = paired_bootstrap_ci(grads["orbit_exact"], grads["augment"], args.bootstrap, boot)
        row["exact_vs_uniform_ci"] = paired_bootstrap_ci(grads["orbit_exact"], grads["orbit_uniform"], args.bootstrap, boot)
        rows.append(row)
    corrupt_ms = corrupt_times(losses, data, float(times[len(times) // 2]), args.seed)
    hdr = (f"{'sigma':>8} {'Var augm':>10} {'Var orb-u':>10} {'Var exact':>10} {'orb-u/aug (90% CI)':>20} "
           f"{'exact/aug (90% CI)':>20} {'exact/orb-u (90% CI)':>21}")
    print(f"\ncrystals: {data.num_graphs} ABX3 cells, torus translations, K={args.crystal_k} uniform vs exact, "
          f"score target, {draws} draws\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['sigma']:>8.4f} {r['augment']:>10.3e} {r['orbit_uniform']:>10.3e} {r['orbit_exact']:>10.3e} "
              f"{_fmt_ratio(r['orbit_uniform'] / r['augment'], r['uniform_ci']):>20} "
              f"{_fmt_ratio(r['orbit_exact'] / r['augment'], r['exact_ci']):>20} "
              f"{_fmt_ratio(r['orbit_exact'] / r['orbit_uniform'], r['exact_vs_uniform_ci']):>21}")
    print("median ms per corrupt() call: " + ", ".join(f"{n} {v:.2f}" for n, v in corrupt_ms.items()))
    return {
        "sigmas": [round(r["sigma"], 6) for r in rows],
        "K": args.crystal_k,
        "grad_var_ratio": [round(r["orbit_uniform"] / r["augment"], 4) for r in rows],
        "grad_var_ratio_exact": [round(r["orbit_exact"] / r["augment"], 4) for r in rows],
        "exact_vs_uniform": [round(r["orbit_exact"] / r["orbit_uniform"], 4) for r in rows],
        "exact_vs_uniform_ci90": [[round(v, 4) for v in r["exact_vs_uniform_ci"]] for r in rows],
        "grad_var": {n: [float(f"{r[n]:.4e}") for r in rows] for n in losses},
        "corrupt_ms": corrupt_ms,
    }


def corrupt_times(losses: dict, data, t_val: float, seed: int, repeats: int = 15) -> dict:
    """Median wall milliseconds of ``loss.corrupt`` per loss at one fixed time (after one warm-up call)."""
    t = torch.full((data.num_graphs,), float(t_val), dtype=torch.float64)
    out = {}
    for name, loss in losses.items():
        gen = torch.Generator().manual_seed(seed)
        loss.corrupt(data, gen, t=t)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loss.corrupt(data, gen, t=t)
            samples.append(1e3 * (time.perf_counter() - t0))
        out[name] = round(sorted(samples)[len(samples) // 2], 3)
    return out


def _fmt_ratio(value: float, ci) -> str:
    return f"{value:.3f} ({ci[0]:.2f}-{ci[1]:.2f})"


def make_plot(path: Path, sigmas, variances: dict, ess_u, ess_g, k: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"plain": ("k", ":"), "augment": ("tab:red", "-"), "orbit_uniform": ("tab:blue", "-"), "orbit_guided": ("tab:green", "--"),
              "orbit_exact": ("tab:purple", "-.")}
    labels = {"plain": "plain (no symmetry)", "augment": "augment (1 random rotation)",
              "orbit_uniform": f"orbit, uniform SO(3), K={k}", "orbit_guided": f"orbit, guided SO(3), K={k}",
              "orbit_exact": "orbit, exact SO(3) (matrix Fisher)"}
    for name, values in variances.items():
        c, ls = styles[name]
        ax1.plot(sigmas, values, color=c, linestyle=ls, marker="o", ms=3, label=labels[name])
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel(r"noise level $\sigma_t / \alpha_t$ (Å)")
    ax1.set_ylabel(r"gradient variance tr Cov[$\nabla_\theta L$]")
    ax1.set_title("gradient variance at fixed t")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.plot(sigmas, ess_u, color="tab:blue", marker="o", ms=3, label="uniform (Haar)")
    ax2.plot(sigmas, ess_g, color="tab:green", linestyle="--", marker="o", ms=3, label="guided")
    ax2.axhline(k, color="gray", lw=0.8, ls=":")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel(r"noise level $\sigma_t / \alpha_t$ (Å)")
    ax2.set_ylabel("mean ESS per graph")
    ax2.set_title(f"effective sample size, K = {k}")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_open(str(path), "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 levels, 24 draws, K=64 (under a minute)")
    ap.add_argument("--levels", type=int, default=None, help="noise levels (default 9, quick 5)")
    ap.add_argument("--min-ratio", type=float, default=1e-3, help="smallest sigma/alpha")
    ap.add_argument("--max-ratio", type=float, default=10.0, help="largest sigma/alpha")
    ap.add_argument("--draws", type=int, default=None, help="gradient draws per level and loss (default 256, quick 24)")
    ap.add_argument("--ess-draws", type=int, default=None, help="corruptions averaged for ESS (default 16, quick 4)")
    ap.add_argument("--k", type=int, default=None, help="SO(3) candidates per graph (default 200, quick 64)")
    ap.add_argument("--molecules", type=int, default=16, help="G2 molecules in the batch (at most 16)")
    ap.add_argument("--parameterization", default="eps", choices=["eps", "x0", "score", "velocity"])
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the ratio intervals")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: the ops are tiny, and on a shared machine a second OpenMP thread "
        "that gets descheduled makes every op wait; measured 50-100x slower per draw under load)",
    )
    ap.add_argument("--crystal-levels", type=int, default=None,
                    help="noise levels of the crystal (torus) section (default 4, quick 2; 0 skips it)")
    ap.add_argument("--crystal-k", type=int, default=1000, help="uniform torus translations of the sampled estimator")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="outputs/variance.png", help="PNG path for the plot ('' to skip)")
    args = ap.parse_args(argv)
    levels = args.levels or (5 if args.quick else 9)
    draws = args.draws or (24 if args.quick else 256)
    ess_draws = args.ess_draws or (4 if args.quick else 16)
    k = args.k or (64 if args.quick else 200)
    torch.set_num_threads(max(1, int(args.threads)))
    start = time.perf_counter()

    data, names = g2_batch(args.molecules)
    schedule = VPSchedule("cosine")
    ratios = torch.logspace(math.log10(args.min_ratio), math.log10(args.max_ratio), levels, dtype=torch.float64)
    times = times_for_noise_ratios(schedule, ratios)
    torch.manual_seed(args.seed)  # only for the model's initialization; all sampling uses generators
    model = PositionTransformer(hidden=args.hidden, num_layers=args.layers, heads=4, species_key="z")
    n_params = sum(p.numel() for p in model.parameters())
    p = args.parameterization
    losses = {
        "plain": OrbitDiffusionLoss(schedule, mode="plain", parameterization=p, center=True),
        "augment": OrbitDiffusionLoss(schedule, SO3(k), mode="augment", parameterization=p),
        "orbit_uniform": OrbitDiffusionLoss(schedule, SO3(k), mode="orbit", parameterization=p),
        "orbit_guided": OrbitDiffusionLoss(schedule, SO3(k, proposal="guided"), mode="orbit", parameterization=p),
        "orbit_exact": OrbitDiffusionLoss(schedule, SO3(proposal="exact"), mode="orbit", parameterization=p),
    }
    print(
        f"batch: {data.num_graphs} G2 molecules, {data.num_nodes} atoms ({', '.join(names)})\n"
        f"model: {model} ({n_params} params, fixed at seeded init); VP cosine, parameterization={p}; "
        f"SO(3) K={k}; {draws} gradient draws, {ess_draws} ESS draws per level; threads {torch.get_num_threads()}"
    )

    rows = []
    for i, (ratio, t_val) in enumerate(zip(ratios.tolist(), times.tolist())):
        t = torch.full((data.num_graphs,), t_val, dtype=torch.float64)
        seed = args.seed + 1000 * (i + 1)
        row = {
            "ratio": ratio,
            "t": t_val,
            "vp_sigma": float(schedule.sigma(torch.tensor(t_val, dtype=torch.float64))),
            "ess_uniform": mean_ess(losses["orbit_uniform"], data, t, ess_draws, seed),
            "ess_guided": mean_ess(losses["orbit_guided"], data, t, ess_draws, seed),
        }
        grads = {}
        for name, loss in losses.items():
            out = gradient_variance(fixed_time_loss(loss, t), model, data, num_draws=draws, seed=seed)
            row[name] = out["total_variance"]
            grads[name] = out["grads"]
        boot = torch.Generator().manual_seed(seed + 7)
        for name in ("orbit_uniform", "orbit_guided", "orbit_exact"):
            row[name + "_ci"] = paired_bootstrap_ci(grads[name], grads["augment"], args.bootstrap, boot)
        for name in ("orbit_uniform", "orbit_guided"):
            row["exact_vs_" + name + "_ci"] = paired_bootstrap_ci(grads["orbit_exact"], grads[name], args.bootstrap, boot)
        rows.append(row)
        print(f"  level {i + 1}/{levels} sigma/alpha={ratio:.2e} done ({time.perf_counter() - start:.0f}s)", flush=True)

    hdr = (
        f"{'sigma/alpha':>11} {'t':>8} {'ESS unif':>9} {'ESS guid':>9} {'Var plain':>10} {'Var augm':>10} "
        f"{'Var orb-u':>10} {'Var orb-g':>10} {'Var exact':>10} {'orb-u/aug (90% CI)':>20} {'orb-g/aug (90% CI)':>20} "
        f"{'exact/aug (90% CI)':>20} {'exact/orb-u (90% CI)':>21} {'exact/orb-g (90% CI)':>21}"
    )
    print("\n" + hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['ratio']:>11.2e} {r['t']:>8.5f} {r['ess_uniform']:>9.2f} {r['ess_guided']:>9.2f} {r['plain']:>10.3e} "
            f"{r['augment']:>10.3e} {r['orbit_uniform']:>10.3e} {r['orbit_guided']:>10.3e} {r['orbit_exact']:>10.3e} "
            f"{_fmt_ratio(r['orbit_uniform'] / r['augment'], r['orbit_uniform_ci']):>20} "
            f"{_fmt_ratio(r['orbit_guided'] / r['augment'], r['orbit_guided_ci']):>20} "
            f"{_fmt_ratio(r['orbit_exact'] / r['augment'], r['orbit_exact_ci']):>20} "
            f"{_fmt_ratio(r['orbit_exact'] / r['orbit_uniform'], r['exact_vs_orbit_uniform_ci']):>21} "
            f"{_fmt_ratio(r['orbit_exact'] / r['orbit_guided'], r['exact_vs_orbit_guided_ci']):>21}"
        )
    print(f"(Var = trace Cov of the parameter gradient over {draws} draws with common random numbers; "
          f"intervals: paired bootstrap, {args.bootstrap} resamples)")

    corrupt_ms = corrupt_times(losses, data, times[len(times) // 2], args.seed)
    print("median ms per corrupt() call (noise + target) at sigma/alpha = "
          f"{float(ratios[len(ratios) // 2]):.2e}: " + ", ".join(f"{n} {v:.2f}" for n, v in corrupt_ms.items()))

    sigmas = [r["ratio"] for r in rows]
    if args.plot:
        variances = {name: [r[name] for r in rows] for name in losses}
        make_plot(
            Path(args.plot), sigmas, variances, [r["ess_uniform"] for r in rows], [r["ess_guided"] for r in rows], k,
            f"{data.num_graphs} G2 molecules, PositionTransformer(hidden={args.hidden}, layers={args.layers}), {p} target, {draws} draws",
        )
        print(f"plot written to {args.plot}")

    crystal_levels = args.crystal_levels if args.crystal_levels is not None else (2 if args.quick else 4)
    crystal = crystal_section(args, draws, crystal_levels) if crystal_levels > 0 else None

    result = {
        "sigmas": [round(s, 6) for s in sigmas],
        "t": [round(r["t"], 6) for r in rows],
        "ess_uniform": [round(r["ess_uniform"], 3) for r in rows],
        "ess_guided": [round(r["ess_guided"], 3) for r in rows],
        "grad_var_ratio": [round(r["orbit_uniform"] / r["augment"], 4) for r in rows],
        "grad_var_ratio_guided": [round(r["orbit_guided"] / r["augment"], 4) for r in rows],
        "grad_var_ratio_ci90": [[round(v, 4) for v in r["orbit_uniform_ci"]] for r in rows],
        "grad_var_ratio_guided_ci90": [[round(v, 4) for v in r["orbit_guided_ci"]] for r in rows],
        "grad_var_ratio_exact": [round(r["orbit_exact"] / r["augment"], 4) for r in rows],
        "grad_var_ratio_exact_ci90": [[round(v, 4) for v in r["orbit_exact_ci"]] for r in rows],
        "exact_vs_uniform": [round(r["orbit_exact"] / r["orbit_uniform"], 4) for r in rows],
        "exact_vs_uniform_ci90": [[round(v, 4) for v in r["exact_vs_orbit_uniform_ci"]] for r in rows],
        "exact_vs_guided": [round(r["orbit_exact"] / r["orbit_guided"], 4) for r in rows],
        "exact_vs_guided_ci90": [[round(v, 4) for v in r["exact_vs_orbit_guided_ci"]] for r in rows],
        "corrupt_ms": corrupt_ms,
        "grad_var": {name: [float(f"{r[name]:.4e}") for r in rows] for name in losses},
        "K": k,
        "draws": draws,
        "parameterization": p,
        "model": f"PositionTransformer(hidden={args.hidden}, layers={args.layers}, heads=4)",
        "params": n_params,
        "molecules": data.num_graphs,
        "quick": bool(args.quick),
        "crystal": crystal,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
