r"""Conformer samplers (ODE and SDE) for a trained :class:`~.objectives.ConformerModel`, and SDF / XYZ writers.

Both objectives are Gaussian paths ``x_t = alpha_t x1 + sigma_t eps`` (``x1`` the clean conformer),
so one pair of samplers serves both. At each step from time ``t`` to the next time ``s`` (closer
to data) the network gives ``x̂ = E[x1 | x_t]`` (from its ``eps`` or velocity output:
``x̂ = (x_t - sigma eps) / alpha`` or ``x̂ = (v - (sigma'/sigma) x_t) / (alpha' - (sigma'/sigma) alpha)``)
and ``ε̂ = (x_t - alpha_t x̂) / sigma_t``;

* ``"ode"`` (DDIM, the probability-flow ODE's first-order integrator): ``x_s = alpha_s x̂ + sigma_s ε̂``;
* ``"sde"`` (ancestral, DDPM posterior): ``x_s ~ N(m, v I)`` with ``a = alpha_t / alpha_s``,
  ``sigma_{t|s}^2 = sigma_t^2 - a^2 sigma_s^2``, ``m = (a sigma_s^2 x_t + alpha_s sigma_{t|s}^2 x̂) / sigma_t^2``,
  ``v = sigma_{t|s}^2 sigma_s^2 / sigma_t^2``.

The last step returns ``x̂``. Noise and iterates are centred per molecule; ``x̂`` is clipped to
``±clip`` Å (the first diffusion steps divide by a tiny ``alpha``). All samples of all molecules
go through the network together, one call per step.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

from orbit_pyg._utils import center
from orbit_pyg.io import atomic_write_text

__all__ = ["sample_positions", "sample_conformers", "sample_many", "time_grid", "posterior_mean", "reverse_step",
           "graph_only", "write_sdf", "write_xyz", "SAMPLERS"]

SAMPLERS = ("ode", "sde")


def time_grid(schedule, steps: int) -> Tensor:
    """``steps + 1`` times from the noise end to the data end of ``schedule`` (float64).

    Example:
        >>> from orbit_pyg import FlowSchedule
        >>> time_grid(FlowSchedule(), 4).tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if int(steps) < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}")
    grid = torch.linspace(0.0, 1.0, int(steps) + 1, dtype=torch.float64)
    return grid if schedule.data_at_one else grid.flip(0)


def posterior_mean(model, out: Tensor, x: Tensor, t: Tensor, batch: Tensor) -> Tensor:
    r"""``x̂ = E[x1 | x_t]`` ``[N, 3]`` (float64) from the network output ``out`` at per-graph times ``t`` ``[B]``.

    ``eps`` models: ``x̂ = (x_t - sigma_t out) / alpha_t``; velocity models:
    ``x̂ = (out - (sigma'/sigma) x_t) / (alpha' - (sigma'/sigma) alpha)`` (the velocity of the Gaussian
    path is linear in ``x1`` and ``x_t``).

    Example:
        >>> from orbit_pyg.integrations.molecule.objectives import ConformerConfig, ConformerModel
        >>> m = ConformerModel(ConformerConfig(objective="flow"))
        >>> x1 = torch.randn(4, 3, dtype=torch.float64); t = torch.full((1,), 0.3, dtype=torch.float64)
        >>> v = x1 - torch.zeros_like(x1)   # FlowSchedule: x_t = t x1 + (1 - t) x0, v = x1 - x0, here x0 = 0
        >>> torch.allclose(posterior_mean(m, v, 0.3 * x1, t, torch.zeros(4, dtype=torch.long)), x1)
        True
    """
    sch = model.schedule
    a = sch.alpha(t)[batch].view(-1, 1)
    s = sch.sigma(t)[batch].view(-1, 1)
    xd = x.to(torch.float64)
    out = out.to(torch.float64)
    if model.parameterization == "eps":
        return (xd - s * out) / a.clamp(min=1e-12)
    a_dot, s_dot = sch.alpha_dot(t)[batch].view(-1, 1), sch.sigma_dot(t)[batch].view(-1, 1)
    ratio = s_dot / s.clamp(min=1e-12)
    return (out - ratio * xd) / (a_dot - ratio * a)


@torch.no_grad()
def reverse_step(model, x: Tensor, t: Tensor, s: Tensor, graph, batch_vec: Tensor, num_graphs: int,
                 sampler: str = "ode", last: bool = False, generator: Optional[torch.Generator] = None,
                 clip: float = 10.0) -> Tensor:
    r"""One reverse step of the sampler from model time ``t`` to ``s`` (0-dim tensors) on positions ``x`` ``[N, 3]``.

    Calls the network once on ``x`` (float32) and returns the centred float64 update of the module
    docstring: ``x̂`` (clipped to ``±clip`` Å) when ``last``, else the DDIM (``"ode"``) or ancestral
    (``"sde"``, centred noise from ``generator``) step to ``s``. :func:`sample_positions` is a loop of
    it; the ASE dynamics calls it once per ``step()``.

    Example:
        >>> from orbit_pyg.integrations.molecule.objectives import ConformerConfig, ConformerModel
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_data
        >>> m = ConformerModel(ConformerConfig(hidden=8, layers=1, heads=2)).eval()
        >>> g = Batch.from_data_list([smiles_to_data("CO")]); x = torch.randn(6, 3, dtype=torch.float64)
        >>> t, s = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
        >>> y = reverse_step(m, x, t, s, g, g.batch, 1)
        >>> y.dtype, float(y.mean(0).abs().max()) < 1e-12
        (torch.float64, True)
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")
    sch = model.schedule
    tb = t.expand(num_graphs)
    out = model(x.to(torch.float32), tb.to(torch.float32), graph)
    x0 = posterior_mean(model, out, x, tb, batch_vec).clamp(-clip, clip)
    if last:
        return center(x0, batch_vec, num_graphs)
    a_t, s_t, a_s, s_s = sch.alpha(t), sch.sigma(t), sch.alpha(s), sch.sigma(s)
    eps = (x - a_t * x0) / s_t
    if sampler == "ode":
        x = a_s * x0 + s_s * eps
    else:
        ratio = a_t / a_s.clamp(min=1e-12)
        var_ts = (s_t**2 - ratio**2 * s_s**2).clamp(min=0)
        mean = (ratio * s_s**2 * x + a_s * var_ts * x0) / s_t**2
        std = (var_ts * s_s**2 / s_t**2).sqrt()
        z = center(torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device), batch_vec, num_graphs)
        x = mean + std * z
    return center(x, batch_vec, num_graphs)


@torch.no_grad()
def sample_positions(model, batch, steps: Optional[int] = None, sampler: Optional[str] = None,
                     generator: Optional[torch.Generator] = None, clip: float = 10.0) -> Tensor:
    r"""Sample positions ``[N, 3]`` (Å, centred) for every molecule of a PyG ``Batch`` (see module docstring).

    Example:
        >>> from orbit_pyg.integrations.molecule.objectives import ConformerConfig, ConformerModel
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_data
        >>> m = ConformerModel(ConformerConfig(hidden=8, layers=1, heads=2)).eval()
        >>> b = Batch.from_data_list([smiles_to_data("CO")] * 2)
        >>> sample_positions(m, b, steps=3, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([12, 3])
    """
    cfg = model.config
    steps = int(steps or cfg.sample_steps)
    sampler = sampler or cfg.sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")
    batch_vec = getattr(batch, "batch", None)
    n = batch.num_nodes
    if batch_vec is None:
        batch_vec = torch.zeros(n, dtype=torch.long)
    b = int(batch_vec.max()) + 1
    device = next(model.parameters()).device
    batch = batch.to(device)
    batch_vec = batch_vec.to(device)
    sch = model.schedule
    grid = time_grid(sch, steps).to(device)
    x = center(torch.randn(n, 3, generator=generator, dtype=torch.float64, device=device), batch_vec, b)
    x = x * sch.sigma(grid[0]).item()
    for k in range(steps):
        x = reverse_step(model, x, grid[k], grid[k + 1], batch, batch_vec, b, sampler, last=k == steps - 1,
                         generator=generator, clip=clip)
    if not torch.isfinite(x).all():
        raise FloatingPointError("the sampler produced non-finite positions (the network returned NaN / Inf)")
    return x.to(torch.float32).cpu()


def graph_only(data: Data) -> Data:
    """The molecular graph of ``data`` (``z``, ``edge_index``, ``edge_attr``, ``charge``), without positions or labels.

    Example:
        >>> sorted(graph_only(Data(z=torch.tensor([8]), pos=torch.zeros(1, 3), y=torch.ones(1))).keys())
        ['num_nodes', 'z']
    """
    keep = {k: data[k] for k in ("z", "edge_index", "edge_attr", "charge") if k in data}
    return Data(**keep, num_nodes=data.num_nodes)


def sample_conformers(model, data: Data, num_samples: int, steps: Optional[int] = None,
                      generator: Optional[torch.Generator] = None, sampler: Optional[str] = None) -> Tensor:
    r"""``num_samples`` conformers ``[S, N, 3]`` (Å, centred) of one molecular graph ``data``.

    ``data`` needs ``z``, ``edge_index``, ``edge_attr`` (e.g. from
    :func:`~orbit_pyg.integrations.molecule.convert.smiles_to_data`); its ``pos``, if any, is ignored.

    Example:
        >>> from orbit_pyg.integrations.molecule.objectives import ConformerConfig, ConformerModel
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_data
        >>> m = ConformerModel(ConformerConfig(hidden=8, layers=1, heads=2)).eval()
        >>> sample_conformers(m, smiles_to_data("CCO"), 3, steps=2).shape
        torch.Size([3, 9, 3])
    """
    if int(num_samples) < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}")
    return sample_many(model, [data], [int(num_samples)], steps, generator, sampler)[0]


def sample_many(model, data_list: Sequence[Data], counts: Sequence[int], steps: Optional[int] = None,
                generator: Optional[torch.Generator] = None, sampler: Optional[str] = None,
                max_nodes_per_batch: int = 4096) -> list[Tensor]:
    """Conformers for several molecules at once: ``counts[i]`` samples ``[counts[i], N_i, 3]`` of ``data_list[i]``.

    Molecules are packed into batches of at most ``max_nodes_per_batch`` atoms.
    """
    if len(data_list) != len(counts):
        raise ValueError("`data_list` and `counts` must have the same length")
    items = [(i, graph_only(d)) for i, d in enumerate(data_list) for _ in range(int(counts[i]))]
    out: list[list[Tensor]] = [[] for _ in data_list]
    chunk: list = []
    nodes = 0

    def flush():
        if not chunk:
            return
        batch = Batch.from_data_list([d for _, d in chunk])
        pos = sample_positions(model, batch, steps, sampler, generator)
        for (i, _), p in zip(chunk, pos.split(batch.ptr.diff().tolist())):
            out[i].append(p)
        chunk.clear()

    for item in items:
        if nodes + item[1].num_nodes > max_nodes_per_batch and chunk:
            flush()
            nodes = 0
        chunk.append(item)
        nodes += item[1].num_nodes
    flush()
    return [torch.stack(o) if o else torch.empty(0, d.num_nodes, 3) for o, d in zip(out, data_list)]


def write_sdf(path: str, data: Data, positions: Tensor) -> None:
    """Write conformers ``[S, N, 3]`` (or ``[N, 3]``) of a molecular graph as an SDF (one record each).

    Example:
        >>> import tempfile, os
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_data
        >>> d = smiles_to_data("O", embed=True); p = os.path.join(tempfile.mkdtemp(), "w.sdf")
        >>> write_sdf(p, d, d.pos.unsqueeze(0).repeat(2, 1, 1)); open(p).read().count("$$$$")
        2
    """
    from rdkit import Chem

    from .convert import data_to_mol

    mol = data_to_mol(data, pos=positions)
    buf = io.StringIO()
    writer = Chem.SDWriter(buf)
    for conf in mol.GetConformers():
        mol.SetProp("_Name", str(getattr(data, "smiles", "")))
        writer.write(mol, confId=conf.GetId())
    writer.close()
    atomic_write_text(path, buf.getvalue())


def write_xyz(path: str, data: Data, positions: Tensor) -> None:
    """Write conformers ``[S, N, 3]`` (or ``[N, 3]``) as a multi-frame XYZ file (``ase.io``)."""
    from ase.io import write

    from .convert import data_to_atoms

    positions = torch.as_tensor(positions)
    if positions.dim() == 2:
        positions = positions.unsqueeze(0)
    frames = [data_to_atoms(data, p) for p in positions]
    buf = io.StringIO()
    write(buf, frames, format="xyz")
    atomic_write_text(path, buf.getvalue())
