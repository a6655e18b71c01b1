"""Shared fixtures: seeded ragged PyG batches and orbit contexts."""
from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch
from torch_geometric.data import Batch, Data

sys.path.insert(0, os.path.dirname(__file__))  # for `import _reference`

import _reference  # noqa: E402
from orbit_pyg.kernels import GaussianKernel  # noqa: E402
from orbit_pyg.orbits import Orbit, OrbitCandidates, OrbitContext  # noqa: E402

# Species of a ragged batch: a single atom, small molecules, a graph with a big class.
SPECIES = [[6], [6, 1, 1, 8], [6, 6, 1, 1, 1, 8], [1, 1, 1], [8, 1, 1, 6, 1]]

# Tiny tensors everywhere: intra-op threads only add wake-up latency (ms per reduction).
torch.set_num_threads(1)


def make_batch(species=SPECIES, seed: int = 0, dtype=torch.float64, scale: float = 1.0) -> Batch:
    """A PyG batch of random unit-scale molecules with species ``z`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    datas = [
        Data(pos=scale * torch.randn(len(z), 3, generator=g, dtype=dtype), z=torch.tensor(z, dtype=torch.long))
        for z in species
    ]
    return Batch.from_data_list(datas)


def center(x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    out = x.clone()
    for b in range(num_graphs):
        sel = batch == b
        out[sel] = x[sel] - x[sel].mean(0)
    return out


def make_ctx(
    data: Batch,
    sigma,
    alpha=1.0,
    seed: int = 1,
    centered: bool = True,
    kernel=None,
    dtype=None,
    xt=None,
) -> OrbitContext:
    """Orbit context with ``x_t = alpha x0 + sigma eps`` per graph (``x0``, ``eps`` centred if asked)."""
    b = data.num_graphs
    x0 = data.pos if dtype is None else data.pos.to(dtype)
    if centered:
        x0 = center(x0, data.batch, b)
    alpha_g = torch.as_tensor(alpha, dtype=torch.float64).expand(b).clone()
    sigma_g = torch.as_tensor(sigma, dtype=torch.float64).expand(b).clone()
    if xt is None:
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        if centered:
            eps = center(eps, data.batch, b)
        xt = (alpha_g[data.batch].view(-1, 1) * x0.double() + sigma_g[data.batch].view(-1, 1) * eps).to(x0.dtype)
    return OrbitContext(
        x0=x0, xt=xt, batch=data.batch, num_graphs=b, alpha=alpha_g, sigma=sigma_g,
        kernel=kernel if kernel is not None else GaussianKernel(), data=data,
    )


def explicit_batch(seed=0):
    """Random (non-symmetric) graphs with listed permutation groups in ``orbit_perm`` (-1 padded)."""
    g = torch.Generator().manual_seed(seed)
    groups = [_reference.dihedral_square(), list(itertools.permutations(range(3))), [(0, 1, 2), (0, 2, 1)], [(0,)], [(0, 1), (1, 0)]]
    sizes = [4, 3, 3, 1, 2]
    datas = []
    for n, group in zip(sizes, groups):
        table = torch.full((n, 8), -1, dtype=torch.long)
        for col, p in enumerate(group):
            table[:, col] = torch.tensor(p)
        datas.append(Data(pos=torch.randn(n, 3, generator=g, dtype=torch.float64), orbit_perm=table))
    return Batch.from_data_list(datas), groups


class TorusTranslations(Orbit):
    """Test orbit: translations of fractional coordinates on the torus, as a ``shift`` factor.

    ``m`` given: the finite group ``(Z_m)^3 / m`` (exactly enumerated, identity first).
    ``m=None``: ``num_candidates`` uniform random shifts (identity first), ``log nu = 0``.
    """

    def __init__(self, m=3, num_candidates=16):
        self.m, self.num_candidates = m, num_candidates

    def _grid(self, device=None):
        r = torch.arange(self.m, dtype=torch.float64, device=device) / self.m
        return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)

    def candidates(self, ctx, generator=None):
        b = ctx.num_graphs
        if self.m:
            shift = self._grid().expand(b, -1, -1).clone()
        else:
            shift = torch.rand(b, self.num_candidates, 3, generator=generator, dtype=torch.float64)
            shift[:, 0] = 0
        return OrbitCandidates(b, shift=shift)

    def random_element(self, ctx, generator=None):
        b = ctx.num_graphs
        if self.m:
            idx = torch.randint(0, self.m**3, (b,), generator=generator)
            return OrbitCandidates(b, shift=self._grid()[idx].unsqueeze(1))
        return OrbitCandidates(b, shift=torch.rand(b, 1, 3, generator=generator, dtype=torch.float64))


def graph_slice(data: Batch, i: int) -> slice:
    return slice(int(data.ptr[i]), int(data.ptr[i + 1]))


@pytest.fixture
def ragged_batch() -> Batch:
    """Five graphs of sizes 1, 4, 6, 3, 5 (float64, seeded) with species ``z``."""
    return make_batch()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(12345)
