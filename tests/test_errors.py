"""Bad input gets a clear exception naming the field and what was expected; nothing silently NaN."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch, Data

from conftest import make_batch, make_ctx
from orbit_pyg import OrbitDiffusionLoss, VESchedule, VPSchedule, FlowSchedule
from orbit_pyg.estimator import orbit_estimate
from orbit_pyg.kernels import WrappedNormalKernel
from orbit_pyg.orbits import (
    O3,
    SO3,
    ExplicitPermutations,
    FiniteGroup,
    OrbitContext,
    ProductOrbit,
    SpeciesPermutation,
)


def _loss(**kw):
    kw.setdefault("orbit", SO3(8))
    return OrbitDiffusionLoss(VPSchedule(), **kw)


def _zero_model(xt, t, data):
    return torch.zeros_like(xt)


# --- positions and batches ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pos,exc,match",
    [
        (torch.randn(4, 2), ValueError, r"`pos` must have shape \[N, 3\], got \[4, 2\]"),
        (torch.randn(4, 3, 1), ValueError, r"`pos` must have shape \[N, 3\]"),
        (torch.tensor([[0.0, float("nan"), 1.0], [1.0, 2.0, 3.0]]), ValueError, "`pos` contains NaN or Inf"),
        (torch.tensor([[0.0, float("inf"), 1.0], [1.0, 2.0, 3.0]]), ValueError, "`pos` contains NaN or Inf"),
        (torch.zeros(0, 3), ValueError, "`pos` is empty"),
        (torch.zeros(3, 3, dtype=torch.long), TypeError, "`pos` must be a floating tensor"),
    ],
    ids=["2d-coords", "3-dims", "nan", "inf", "empty", "integer"],
)
@pytest.mark.parametrize("mode", ["plain", "augment", "orbit"])
def test_bad_positions(pos, exc, match, mode):
    with pytest.raises(exc, match=match):
        _loss(mode=mode)(_zero_model, Data(pos=pos))


def test_missing_positions_and_unsorted_batch():
    with pytest.raises(KeyError, match="no `coords`"):
        _loss(pos_key="coords").corrupt(Data(pos=torch.randn(3, 3)))
    data = make_batch([[1, 1], [1, 1]], dtype=torch.float32)
    data.batch = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="`batch` must be sorted"):
        _loss().corrupt(data)


def test_wrong_number_of_times():
    data = make_batch([[1, 1], [1, 1, 1]], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"one time per graph \(2\), got 3"):
        _loss().corrupt(data, t=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _loss().corrupt(data, t=torch.tensor([0.1, 1.2]))


# --- loss configuration -------------------------------------------------------------------------


def test_bad_loss_configuration():
    with pytest.raises(ValueError, match="unknown parameterization 'noise'"):
        _loss(parameterization="noise")
    with pytest.raises(ValueError, match="unknown mode 'rao'"):
        _loss(mode="rao")
    for mode in ("augment", "orbit"):
        with pytest.raises(ValueError, match=f"mode '{mode}' needs an orbit"):
            OrbitDiffusionLoss(VPSchedule(), mode=mode)
    with pytest.raises(TypeError, match="`orbit` must be an orbit_pyg.orbits.Orbit"):
        OrbitDiffusionLoss(VPSchedule(), orbit="SO3", mode="orbit")
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        _loss(reduction="max")
    for p in ("eps", "x0", "velocity"):
        with pytest.raises(ValueError, match="parameterization='score' only"):
            OrbitDiffusionLoss(VESchedule(), mode="plain", parameterization=p, kernel=WrappedNormalKernel())


def test_prediction_of_the_wrong_shape():
    data = make_batch([[1, 1, 1], [1, 1]], dtype=torch.float32)
    loss = _loss(mode="orbit")
    noisy = loss.corrupt(data, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"prediction must have shape \[5, 3\].*got \[5, 2\]"):
        loss.criterion(torch.zeros(5, 2), noisy)
    with pytest.raises(ValueError, match=r"prediction must have shape \[5, 3\].*got \[2, 3\]"):
        loss(lambda xt, t, d: torch.zeros(2, 3), data)  # one vector per graph instead of per node
    with pytest.raises(ValueError, match="prediction must have shape.*got list"):
        loss.criterion([[0.0, 0.0, 0.0]] * 5, noisy)


# --- orbits -------------------------------------------------------------------------------------


def test_orbits_reject_k_below_one_and_unknown_proposals():
    for cls in (SO3, O3):
        with pytest.raises(ValueError, match=r"`num_candidates` must be >= 1, got 0"):
            cls(num_candidates=0)
        with pytest.raises(ValueError, match="unknown proposal 'kabsch'"):
            cls(proposal="kabsch")
        with pytest.raises(ValueError, match="uniform_fraction"):
            cls(proposal="guided", uniform_fraction=0.0)
    with pytest.raises(ValueError, match=r"`max_candidates` must be >= 1, got 0"):
        SpeciesPermutation(max_candidates=0)
    with pytest.raises(ValueError, match="unknown proposal 'greedy'"):
        SpeciesPermutation(proposal="greedy")
    with pytest.raises(ValueError, match="uniform_fraction"):
        SpeciesPermutation(uniform_fraction=1.5)
    with pytest.raises(ValueError, match="at least one orbit"):
        ProductOrbit([])


def test_missing_or_malformed_species():
    data = Batch.from_data_list([Data(pos=torch.randn(3, 3)), Data(pos=torch.randn(2, 3))])
    ctx = make_ctx(data, sigma=0.5)
    with pytest.raises(KeyError, match="node attribute `z`"):
        SpeciesPermutation().candidates(ctx)
    with pytest.raises(KeyError, match="node attribute `atom_types`"):
        OrbitDiffusionLoss(VPSchedule(), SpeciesPermutation(key="atom_types"), mode="orbit").corrupt(data)
    with pytest.raises(KeyError, match="node attribute `z`"):
        OrbitDiffusionLoss(VPSchedule(), SpeciesPermutation(), mode="augment").corrupt(data)
    data.z = torch.ones(4, dtype=torch.long)
    with pytest.raises(ValueError, match="`z` has 4 rows but the batch has 5 nodes"):
        SpeciesPermutation().candidates(make_ctx(data, sigma=0.5))
    data.z = torch.ones(5, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="vector of species"):
        SpeciesPermutation().candidates(make_ctx(data, sigma=0.5))


def test_bad_explicit_permutations_and_finite_groups():
    with pytest.raises(ValueError, match="contains 'index'"):
        ExplicitPermutations(key="perm_index")
    pos = torch.randn(3, 3)
    ctx = lambda d: OrbitContext(x0=d.pos, xt=d.pos, batch=torch.zeros(3, dtype=torch.long), num_graphs=1, data=d)  # noqa: E731
    with pytest.raises(ValueError, match="column 0 of `orbit_perm` must be the identity"):
        ExplicitPermutations().candidates(ctx(Data(pos=pos, orbit_perm=torch.tensor([[1, 0], [0, 1], [2, 2]]))))
    with pytest.raises(ValueError, match="beyond its graph's node count"):
        ExplicitPermutations().candidates(ctx(Data(pos=pos, orbit_perm=torch.tensor([[0, 3], [1, 1], [2, 2]]))))
    with pytest.raises(KeyError, match="`orbit_perm`"):
        ExplicitPermutations().candidates(ctx(Data(pos=pos)))
    with pytest.raises(ValueError, match=r"`elements` must have shape \[G, 3, 3\]"):
        FiniteGroup(torch.eye(3))
    with pytest.raises(ValueError, match=r"`elements` must have shape \[G, 3, 3\]"):
        FiniteGroup(torch.zeros(0, 3, 3))


def test_estimator_input_checks():
    data = make_batch([[1, 1, 1]])
    ctx = make_ctx(data, sigma=0.5)
    with pytest.raises(ValueError, match="unknown target 'eps'"):
        orbit_estimate(SO3(4), ctx, target="eps")
    wn = make_ctx(data, sigma=0.5, kernel=WrappedNormalKernel(), centered=False)
    with pytest.raises(ValueError, match="target 'x0' needs a Gaussian kernel"):
        orbit_estimate(SO3(4), wn, target="x0")
    bare = OrbitContext(x0=ctx.x0, xt=None, batch=ctx.batch, num_graphs=1)
    with pytest.raises(ValueError, match="needs xt, alpha, sigma and kernel"):
        orbit_estimate(SpeciesPermutation(), bare)
    with pytest.raises(ValueError, match="needs xt, alpha and sigma"):
        SO3(4).candidates(bare)
    for chunk in (0, -3):
        with pytest.raises(ValueError, match=f"`chunk_size` must be >= 1, got {chunk}"):
            orbit_estimate(SO3(4), ctx, target="score", chunk_size=chunk)


def test_schedule_input_checks():
    with pytest.raises(ValueError, match="`noise` must be >= 0"):
        FlowSchedule(noise=-0.1)
    with pytest.raises(ValueError, match="`t_max` must lie in"):
        FlowSchedule(t_max=1.0)
