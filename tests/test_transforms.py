"""The PyG transforms: conventions, mathematics of their targets, batching, DataLoader workers, errors.

Every target is checked against an independent computation from what the transform stored on the
``Data`` (``xt``, ``x0``, ``t``): a closed form for ``plain``, a brute-force enumeration of the
finite group for ``orbit`` on permutation groups, and a 1-D quadrature for torus translations
(whose posterior over the shift factorizes over the three axes).
"""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data.datapipes.datapipe import IterDataPipe
from torch.utils.data.datapipes.iter import IterableWrapper
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader
from torch_geometric.transforms import BaseTransform, Compose, RandomRotate
from torch_geometric.utils import scatter

from orbit_pyg.data import ListDataset
from orbit_pyg import (
    SO3,
    ExplicitPermutations,
    FiniteGroup,
    OrbitDiffusionLoss,
    SpeciesPermutation,
    VESchedule,
    VPSchedule,
    WrappedNormalKernel,
)
from orbit_pyg.integrations.crystal.orbits import TorusTranslation
from orbit_pyg.orbits import rotation_angle
from orbit_pyg.transforms import (
    AttachOrbitStructure,
    BatchedOrbitNoise,
    CenterPositions,
    OrbitNoise,
    RandomOrbitAction,
)

SPECIES = [[6, 1, 1, 8], [1, 1, 1], [6, 6, 1, 1, 1, 8], [8], [7, 1, 1]]


def molecules(seed: int = 0, dtype=torch.float64, offset: float = 0.0) -> list[Data]:
    g = torch.Generator().manual_seed(seed)
    return [
        Data(pos=torch.randn(len(z), 3, generator=g, dtype=dtype) + offset, z=torch.tensor(z))
        for z in SPECIES
    ]


def crystal(n: int = 5, seed: int = 0) -> Data:
    g = torch.Generator().manual_seed(seed)
    return Data(
        frac_coords=torch.rand(n, 3, generator=g, dtype=torch.float64),
        atom_types=torch.randint(1, 90, (n,), generator=g),
        cell=4.0 * torch.eye(3).unsqueeze(0),
        num_nodes=n,
    )


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- PyG conventions ------------------------------------------------------------------------------

def _transforms():
    sched = VPSchedule()
    return [
        CenterPositions(),
        RandomOrbitAction(SO3(), generator=gen()),
        RandomOrbitAction(SpeciesPermutation(), generator=gen()),
        AttachOrbitStructure(lambda d: [list(range(d.num_nodes))[::-1]], max_permutations=3),
        OrbitNoise(sched, mode="plain", generator=gen()),
        OrbitNoise(sched, SpeciesPermutation(max_candidates=10) * SO3(20), mode="augment", generator=gen()),
        OrbitNoise(sched, SpeciesPermutation(max_candidates=10) * SO3(20), mode="orbit", generator=gen()),
        BatchedOrbitNoise(sched, SO3(20), mode="orbit", generator=gen()),
    ]


@pytest.mark.parametrize("transform", _transforms(), ids=lambda t: type(t).__name__)
def test_transform_is_base_transform_and_leaves_input_untouched(transform):
    assert isinstance(transform, BaseTransform)
    data = molecules(offset=3.0)[2]  # 6 atoms, species group of order 12
    if isinstance(transform, BatchedOrbitNoise):
        data = Batch.from_data_list(molecules(offset=3.0))
    pos_object, pos_values, keys = data.pos, data.pos.clone(), set(data.keys())
    out = transform(data)
    assert out is not data
    assert data.pos is pos_object and torch.equal(data.pos, pos_values), "the input's positions were modified"
    assert set(data.keys()) == keys, "the transform wrote onto the input object"
    assert set(out.keys()) >= keys
    if isinstance(transform, (CenterPositions, RandomOrbitAction)):
        assert not torch.allclose(out.pos, pos_values)  # it did act, on a copy


def test_repr_shows_arguments():
    assert repr(CenterPositions("frac_coords")) == "CenterPositions(pos_key='frac_coords')"
    r = repr(RandomOrbitAction(SO3(num_candidates=7), pos_key="coords"))
    assert "SO3(num_candidates=7" in r and "pos_key='coords'" in r
    r = repr(AttachOrbitStructure("automorphisms", max_permutations=12))
    assert "permutations='automorphisms'" in r and "max_permutations=12" in r
    r = repr(OrbitNoise(VPSchedule("linear"), SO3(30), mode="augment", parameterization="x0"))
    for part in ("VPSchedule(kind='linear'", "SO3(num_candidates=30", "mode='augment'", "parameterization='x0'", "GaussianKernel()"):
        assert part in r, (part, r)
    r = repr(BatchedOrbitNoise(VESchedule(), TorusTranslation(10), parameterization="score", kernel=WrappedNormalKernel(), pos_key="frac_coords"))
    assert r.startswith("BatchedOrbitNoise(") and "TorusTranslation(num_candidates=10" in r
    assert "WrappedNormalKernel(" in r and "pos_key='frac_coords'" in r


def test_functional_names_registered_with_orbit_prefix():
    import torch_geometric.transforms  # noqa: F401  (PyG's own names are registered first)

    import orbit_pyg.transforms as first
    import orbit_pyg.transforms as second  # importing again is a no-op

    assert first is second
    names = ["orbit_center", "orbit_random_action", "orbit_structure", "orbit_noise"]
    mappers = [IterDataPipe.functions[name] for name in names]  # KeyError if one is missing
    assert len({id(m.args[0]) for m in mappers}) == len(names)  # four distinct datapipes
    assert IterDataPipe.functions["center"].args[0] not in {m.args[0] for m in mappers}  # PyG's untouched
    data = molecules(offset=3.0)[0]
    before = data.pos.clone()
    out = list(IterableWrapper([data]).orbit_center())[0]
    assert torch.allclose(out.pos.mean(0), torch.zeros(3, dtype=out.pos.dtype), atol=1e-12)
    assert torch.equal(data.pos, before)  # input untouched
    noised = list(IterableWrapper([data]).orbit_noise(VPSchedule(), SO3(10)))[0]
    assert noised.target.shape == data.pos.shape and noised.t.shape == (1,)


def test_center_positions_per_graph_on_a_batch():
    batch = Batch.from_data_list(molecules(offset=2.0))
    out = CenterPositions()(batch)
    means = scatter(out.pos, out.batch, dim=0, reduce="mean")
    assert torch.allclose(means, torch.zeros_like(means), atol=1e-12)
    assert torch.allclose(out.pos - batch.pos, (out.pos - batch.pos)[out.ptr[:-1]][out.batch])  # one shift per graph


# --- RandomOrbitAction: Haar rotations about the centroid ------------------------------------------

_SHAPE = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 3], [-1, -2, -3]], dtype=torch.float64)  # zero mean, full rank


def _rotations(outputs: torch.Tensor, center: float) -> torch.Tensor:
    """``R`` with ``out - c = (x - c) Rᵀ`` for every output ``[G, 4, 3]`` of ``_SHAPE + c``."""
    rt = torch.linalg.lstsq(_SHAPE.expand(outputs.size(0), 4, 3), outputs - center).solution
    return rt.transpose(-1, -2)


def _entry_pvalue(rot: torch.Tensor) -> float:
    """Smallest KS p-value of the 9 entries against U[-1, 1] (each entry of a Haar rotation is uniform)."""
    return min(stats.kstest(rot[:, i, j].numpy(), stats.uniform(-1, 2).cdf).pvalue for i in range(3) for j in range(3))


def test_random_orbit_action_so3_is_a_haar_rotation_about_the_centroid():
    c, g = 5.0, 2000
    batch = Batch.from_data_list([Data(pos=_SHAPE + c)] * g)
    out = RandomOrbitAction(SO3(), generator=gen(0))(batch)
    pos = out.pos.view(g, 4, 3)
    # isometry and fixed centroid, per graph
    assert torch.allclose(torch.cdist(pos, pos), torch.cdist(_SHAPE, _SHAPE).expand(g, 4, 4), atol=1e-10)
    assert torch.allclose(pos.mean(1), torch.full((g, 3), c, dtype=torch.float64), atol=1e-12)
    rot = _rotations(pos, c)
    eye = torch.eye(3, dtype=torch.float64).expand(g, 3, 3)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye, atol=1e-9)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(g, dtype=torch.float64), atol=1e-9)
    # Haar: angle density (1 - cos θ)/π, CDF (θ - sin θ)/π; every matrix entry uniform on [-1, 1]
    theta = rotation_angle(rot).numpy()
    assert stats.kstest(theta, lambda x: (x - np.sin(x)) / math.pi).pvalue > 1e-3
    assert _entry_pvalue(rot) > 1e-3 / 9
    # independent per graph: not one rotation for all
    assert rot.std(0).min() > 0.3


def test_composed_pyg_random_rotate_is_not_haar():
    """Three PyG ``RandomRotate`` about x, y, z with uniform angles: Euler angles, not Haar (an entry
    is ``± sin β`` with β uniform, arcsine-distributed instead of uniform)."""
    random.seed(0)
    euler = Compose([RandomRotate(180, axis=0), RandomRotate(180, axis=1), RandomRotate(180, axis=2)])
    outs = torch.stack([euler(Data(pos=_SHAPE.clone())).pos for _ in range(2000)])
    assert _entry_pvalue(_rotations(outs, 0.0)) < 1e-8


def test_random_orbit_action_single_data_species_permutation():
    data = molecules()[2]
    action = RandomOrbitAction(SpeciesPermutation(), generator=gen(3))
    before = sorted(zip(data.z.tolist(), data.pos.tolist()))
    moved = 0
    for _ in range(5):
        out = action(data)
        # a relabelling of equal-species atoms: the multiset of (z, pos) rows is unchanged
        assert sorted(zip(out.z.tolist(), out.pos.tolist())) == before and torch.equal(out.z, data.z)
        moved += not torch.equal(out.pos, data.pos)
    assert moved >= 3  # the group has order 12: the identity is rare


# --- AttachOrbitStructure ---------------------------------------------------------------------------

GROUPS = [
    [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]],  # C4 on a ring of 4
    [[0, 1, 2]],  # trivial
    [[0, 1], [1, 0]],
    [[0, 1, 2, 3, 4], [0, 2, 1, 3, 4], [0, 1, 2, 4, 3], [0, 2, 1, 4, 3]],  # Z2 x Z2
]


def _with_structure(groups, max_permutations=4, seed=0):
    g = gen(seed)
    t = AttachOrbitStructure(lambda d: d.group, max_permutations=max_permutations)
    datas = []
    for group in groups:
        d = Data(pos=torch.randn(len(group[0]), 3, generator=g, dtype=torch.float64), z=torch.ones(len(group[0]), dtype=torch.long))
        d.group = group
        datas.append(t(d))
    for d in datas:
        del d.group
    return datas


def test_orbit_perm_batches_to_global_candidates():
    batch = Batch.from_data_list(_with_structure(GROUPS))
    assert batch.orbit_perm.shape == (sum(len(g[0]) for g in GROUPS), 4)
    from orbit_pyg.orbits import OrbitContext

    ctx = OrbitContext(x0=batch.pos, xt=batch.pos, batch=batch.batch, num_graphs=batch.num_graphs, data=batch)
    cands = ExplicitPermutations(key="orbit_perm").candidates(ctx)
    ptr = batch.ptr
    # every candidate maps each node to a node of its own graph
    lo, hi = ptr[batch.batch], ptr[batch.batch + 1]
    assert bool(((cands.perm >= lo) & (cands.perm < hi)).all())
    for b, group in enumerate(GROUPS):
        sl = slice(int(ptr[b]), int(ptr[b + 1]))
        assert cands.perm_mask[b].tolist() == [a < len(group) for a in range(4)]  # -1 padding masked
        for a, p in enumerate(group):
            assert (cands.perm[a, sl] - ptr[b]).tolist() == p
        for a in range(len(group), 4):  # padded columns hold the identity, never another graph's nodes
            assert (cands.perm[a, sl] - ptr[b]).tolist() == list(range(len(group[0])))


def test_orbit_perm_identity_first_dedup_and_truncation():
    t = AttachOrbitStructure(lambda d: [[2, 0, 1], [0, 1, 2], [2, 0, 1], [1, 2, 0]], max_permutations=5)
    table = t(Data(pos=torch.zeros(3, 3))).orbit_perm
    assert table.t().tolist() == [[0, 1, 2], [2, 0, 1], [1, 2, 0], [-1, -1, -1], [-1, -1, -1]]
    small = AttachOrbitStructure(lambda d: [[2, 0, 1], [1, 2, 0]], max_permutations=2)(Data(pos=torch.zeros(3, 3)))
    assert small.orbit_perm.t().tolist() == [[0, 1, 2], [2, 0, 1]]
    none = AttachOrbitStructure()(Data(pos=torch.zeros(2, 3), z=torch.tensor([1, 1])))
    assert none.orbit_perm.tolist() == [[0] + [-1] * 49, [1] + [-1] * 49]
    assert math.isclose(float(none.orbit_log_order), math.log(2), rel_tol=1e-6)
    single = AttachOrbitStructure(lambda d: [1, 0])(Data(pos=torch.zeros(2, 3)))  # one permutation, flat
    assert single.orbit_perm[:, :2].tolist() == [[0, 1], [1, 0]]
    from_attr = AttachOrbitStructure("autos", max_permutations=2)(Data(pos=torch.zeros(2, 3), autos=torch.tensor([[1, 0]])))
    assert from_attr.orbit_perm.tolist() == [[0, 1], [1, 0]]


@pytest.mark.parametrize(
    "perms, match",
    [
        ([[0, 0, 1]], "rearrangement"),  # not a bijection
        ([[0, 1, 3]], "rearrangement"),  # out of range
        ([[0, 1, -1]], "rearrangement"),  # padding is the transform's job
        ([[0, 1]], r"\[A, 3\]"),  # wrong length
        ([[0, 1, 2, 0, 1, 2]], r"\[A, 3\]"),  # wrong length, even when divisible by n
        ([[0, 1, 2], [1, 0]], "permutations"),  # ragged
    ],
)
def test_bad_permutations_rejected(perms, match):
    with pytest.raises(ValueError, match=match):
        AttachOrbitStructure(lambda d: perms)(Data(pos=torch.zeros(3, 3)))


def test_attach_structure_bad_input():
    with pytest.raises(ValueError, match="max_permutations"):
        AttachOrbitStructure(max_permutations=0)
    with pytest.raises(ValueError, match="z"):
        AttachOrbitStructure()(Data(pos=torch.zeros(3, 3), z=torch.tensor([1, 1])))


# --- OrbitNoise / BatchedOrbitNoise: shapes, batching, exact targets ---------------------------------

def _coefficients(schedule, t, batch):
    t = t.to(torch.float64)
    col = lambda v: v[batch].view(-1, 1)  # noqa: E731
    return (col(schedule.alpha(t)), col(schedule.sigma(t)), col(schedule.alpha_dot(t)), col(schedule.sigma_dot(t)))


@pytest.mark.parametrize("parameterization", ["eps", "x0", "score", "velocity"])
def test_plain_targets_closed_form(parameterization):
    sched = VPSchedule()
    kw = dict(mode="plain", parameterization=parameterization)
    per_sample = OrbitNoise(sched, generator=gen(7), **kw)
    a = Batch.from_data_list([per_sample(d) for d in molecules()])
    b = BatchedOrbitNoise(sched, generator=gen(7), **kw)(Batch.from_data_list(molecules()))
    for out in (a, b):
        assert out.t.shape == (5,) and out.ess.shape == (5,) and torch.equal(out.ess, torch.ones(5, dtype=out.ess.dtype))
        assert torch.equal(out.x0, out.pos)  # plain, no orbit: nothing moves x0
        alpha, sigma, a_dot, s_dot = _coefficients(sched, out.t, out.batch)
        resid = out.xt - alpha * out.x0
        expected = {"eps": resid / sigma, "x0": out.x0, "score": -resid / sigma**2,
                    "velocity": a_dot * out.x0 + s_dot / sigma * resid}[parameterization]
        torch.testing.assert_close(out.target, expected, rtol=1e-10, atol=1e-10)
    if parameterization == "eps":  # the noise itself: target * sigma == xt - alpha x0
        alpha, sigma, _, _ = _coefficients(sched, a.t, a.batch)
        torch.testing.assert_close(a.target * sigma, a.xt - alpha * a.x0, rtol=0, atol=1e-12)


def _group_elements(data: Data, orbit: str) -> list[tuple[torch.Tensor, float]]:
    """All (permutation, sign) elements of the graph's group, independently of the package."""
    n = data.num_nodes
    if orbit == "explicit":
        table = data.orbit_perm
        perms = [table[:, a] for a in range(table.size(1)) if bool((table[:, a] >= 0).all())]
        return [(p, 1.0) for p in perms]
    classes = [[i for i in range(n) if int(data.z[i]) == s] for s in sorted(set(data.z.tolist()))]
    perms = []
    for choice in itertools.product(*[itertools.permutations(c) for c in classes]):
        p = list(range(n))
        for cls, image in zip(classes, choice):
            for dst, src in zip(cls, image):
                p[dst] = src
        perms.append(torch.tensor(p))
    signs = (1.0, -1.0) if orbit == "species_x_inversion" else (1.0,)
    return [(p, s) for p in perms for s in signs]


def _graphs(batch: Batch) -> list[Data]:
    """Per-graph views of a batch, including keys written after batching (``to_data_list`` skips those)."""
    out = []
    for b in range(batch.num_graphs):
        sl = slice(int(batch.ptr[b]), int(batch.ptr[b + 1]))
        d = Data(num_nodes=sl.stop - sl.start, t=batch.t[b], ess=batch.ess[b])
        for key in ("pos", "z", "xt", "x0", "target", "orbit_perm"):
            if key in batch:
                d[key] = batch[key][sl]
        out.append(d)
    return out


def _brute_force(data: Data, schedule, orbit: str, parameterization: str):
    """Posterior mean over the whole finite orbit of ``data.x0`` given ``data.xt`` at ``data.t``."""
    t = data.t.to(torch.float64)
    alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
    cands = torch.stack([s * data.x0[p] for p, s in _group_elements(data, orbit)])  # [G, n, 3]
    logits = -((data.xt - alpha * cands) ** 2).sum((1, 2)) / (2 * sigma**2)
    w = torch.softmax(logits, 0)
    x0_hat = (w.view(-1, 1, 1) * cands).sum(0)
    target = x0_hat if parameterization == "x0" else (data.xt - alpha * x0_hat) / sigma
    return target, 1.0 / float((w**2).sum())


def _orbit(kind: str):
    if kind == "explicit":
        return ExplicitPermutations()
    species = SpeciesPermutation(max_candidates=1000)  # every group here is enumerated exactly
    return species * FiniteGroup(torch.stack([torch.eye(3), -torch.eye(3)])) if kind == "species_x_inversion" else species


def _explicit_groups(datas):
    groups = []
    for d in datas:  # each graph's full species group, given as an explicit list
        groups.append([p.tolist() for p, _ in _group_elements(d, "species")])
    t = AttachOrbitStructure(lambda d: d.group, max_permutations=max(len(g) for g in groups))
    out = []
    for d, group in zip(datas, groups):
        d = d.clone()
        d.group = group
        d = t(d)
        del d.group
        out.append(d)
    return out


@pytest.mark.parametrize("orbit", ["species", "species_x_inversion", "explicit"])
@pytest.mark.parametrize("parameterization", ["eps", "x0"])
def test_orbit_targets_equal_brute_force_posterior_mean(orbit, parameterization):
    """Per-sample OrbitNoise (then batching) and BatchedOrbitNoise with the same seed: each target
    is the exact posterior mean over the finite orbit, recomputed from the stored xt, x0, t."""
    sched = VPSchedule()
    datas = molecules(seed=1)
    if orbit == "explicit":
        datas = _explicit_groups(datas)
    kw = dict(mode="orbit", parameterization=parameterization)
    per_sample = OrbitNoise(sched, _orbit(orbit), generator=gen(11), **kw)
    a = Batch.from_data_list([per_sample(d) for d in datas])
    b = BatchedOrbitNoise(sched, _orbit(orbit), generator=gen(11), **kw)(Batch.from_data_list(datas))
    for out in (a, b):
        assert out.t.shape == (5,) and out.ess.shape == (5,)
        assert out.xt.shape == out.target.shape == out.x0.shape == out.pos.shape
        ess_seen = []
        for d in _graphs(out):
            expected, ess = _brute_force(d, sched, orbit, parameterization)
            torch.testing.assert_close(d.target, expected, rtol=1e-8, atol=1e-8)
            assert math.isclose(float(d.ess), ess, rel_tol=1e-8)
            ess_seen.append(ess)
        assert max(ess_seen) > 1.05  # the seed reaches noise levels where the orbit average matters
    # the two routes drew different noise, yet neither is the plain target
    assert not torch.allclose(a.xt, b.xt)


def test_transform_stores_what_corrupt_computes():
    loss = OrbitDiffusionLoss(VPSchedule(), SpeciesPermutation(max_candidates=20) * SO3(50, proposal="guided"), mode="orbit")
    data = molecules()[2]
    out = OrbitNoise(loss=loss, generator=gen(5))(data)
    ref = loss.corrupt(data, gen(5))
    for key in ("xt", "t", "target", "x0"):
        assert torch.equal(out[key], getattr(ref, key)), key
    assert torch.equal(out.ess, ref.ess.to(out.ess.dtype))
    batch = Batch.from_data_list(molecules())
    out = BatchedOrbitNoise(loss=loss, generator=gen(5))(batch)
    ref = loss.corrupt(batch, gen(5))
    assert torch.equal(out.target, ref.target) and torch.equal(out.t, ref.t)
    again = BatchedOrbitNoise(loss=loss, generator=gen(5))(batch)  # same seed, same targets
    assert torch.equal(again.target, out.target)


def test_custom_keys_and_no_overwrite_of_clean_positions():
    out = OrbitNoise(VPSchedule(), SO3(10), keys={"xt": "noisy", "target": "y_denoise"}, generator=gen())(molecules()[0])
    assert "noisy" in out and "y_denoise" in out and "xt" not in out
    with pytest.raises(ValueError, match="xt"):
        OrbitNoise(VPSchedule(), SO3(10), keys={"xt": "pos"})


# --- an unchanged training loop, with DataLoader workers ---------------------------------------------


def _one_thread(_worker_id):
    torch.set_num_threads(1)


def _dataset(n=24, **noise_kw):
    g = gen(0)
    items = []
    for i in range(n):
        k = 3 + i % 4
        items.append(Data(pos=torch.randn(k, 3, generator=g), z=torch.randint(1, 4, (k,), generator=g)))
    orbit = SpeciesPermutation(max_candidates=6) * SO3(32)
    return ListDataset(items, Compose([CenterPositions(), OrbitNoise(VPSchedule(), orbit, **noise_kw)]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unchanged_training_loop_with_dataloader(num_workers):
    torch.manual_seed(0)
    loader = DataLoader(_dataset(), batch_size=6, shuffle=True, num_workers=num_workers, worker_init_fn=_one_thread)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, ts = [], []
    for _ in range(2):
        for batch in loader:
            assert batch.t.shape == (batch.num_graphs,) and batch.ess.shape == (batch.num_graphs,)
            pred = model(torch.cat([batch.xt, batch.t[batch.batch].view(-1, 1)], -1))
            loss = ((pred - batch.target) ** 2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            ts.append(batch.t)
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert torch.cat(ts).unique().numel() > 20  # fresh noise levels across batches, workers and epochs


def _draws(loader, epochs=2):
    return [torch.cat([b.xt for b in loader]) for _ in range(epochs)]


def test_generator_in_workers_does_not_repeat_noise():
    """A generator given to OrbitNoise is copied into each worker: each worker (and epoch) must still
    draw its own noise, and the run must be reproducible under ``torch.manual_seed``."""
    ds = ListDataset([Data(pos=torch.zeros(3, 3))] * 8, OrbitNoise(VPSchedule(), mode="plain", generator=gen(0)))
    loader = DataLoader(ds, batch_size=2, num_workers=2, worker_init_fn=_one_thread)
    torch.manual_seed(0)
    first = _draws(loader)
    batches = first[0].view(4, 6, 3)
    assert not torch.equal(batches[0], batches[1]), "worker 0 and worker 1 drew the same noise"
    assert not torch.equal(first[0], first[1]), "two epochs drew the same noise"
    torch.manual_seed(0)
    assert all(torch.equal(x, y) for x, y in zip(first, _draws(loader)))


# --- bad input ------------------------------------------------------------------------------------

NOISE = lambda **kw: OrbitNoise(VPSchedule(), SpeciesPermutation() * SO3(10), **kw)  # noqa: E731


@pytest.mark.parametrize(
    "transform",
    [NOISE(), CenterPositions(), RandomOrbitAction(SO3()), BatchedOrbitNoise(VPSchedule(), SO3(10))],
    ids=lambda t: type(t).__name__,
)
def test_missing_or_bad_positions_name_the_key(transform):
    with pytest.raises(KeyError, match="pos"):
        transform(Data(z=torch.tensor([1, 1]), num_nodes=2))
    nan = torch.zeros(2, 3)
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="pos"):
        transform(Data(pos=nan, z=torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="pos"):
        transform(Data(pos=torch.zeros(2, 2), z=torch.tensor([1, 1])))


def test_wrong_species_length_names_z():
    bad = Data(pos=torch.randn(3, 3), z=torch.tensor([1, 1]))
    for transform in (NOISE(), RandomOrbitAction(SpeciesPermutation()), NOISE(mode="augment")):
        with pytest.raises(ValueError, match="z"):
            transform(bad)
    with pytest.raises(KeyError, match="z"):
        NOISE()(Data(pos=torch.randn(3, 3)))


def test_crystal_missing_frac_coords_names_the_key():
    noise = OrbitNoise(VESchedule(), TorusTranslation(10), kernel=WrappedNormalKernel(), parameterization="score", pos_key="frac_coords")
    with pytest.raises(KeyError, match="frac_coords"):
        noise(Data(pos=torch.rand(3, 3)))
    with pytest.raises(ValueError, match="score"):
        OrbitNoise(VESchedule(), TorusTranslation(10), kernel=WrappedNormalKernel(), parameterization="eps")


# --- crystals: torus translations with the wrapped normal ---------------------------------------------

def _torus_exact(xt, x0, sigma, batch, num_graphs, points=4096):
    """Exact orbit score target: the posterior over the shift m factorizes over the 3 axes,
    p(m_d) ∝ prod_i WN(xt_id - x0_id - m_d), so a 1-D periodic trapezoid rule per axis is exact to
    spectral accuracy: target_id = E[score_WN(xt_id - x0_id - m_d)]."""
    kernel = WrappedNormalKernel()
    m = torch.arange(points, dtype=torch.float64).view(-1, 1, 1) / points
    terms, score = kernel.log_prob_and_score(xt.unsqueeze(0), x0.unsqueeze(0) + m, None, sigma[batch].view(1, -1, 1))
    log_post = scatter(terms, batch, dim=1, dim_size=num_graphs, reduce="sum")  # [M, B, 3]
    w = torch.softmax(log_post, 0)
    return (w[:, batch] * score).sum(0)


def test_crystal_orbit_noise_on_frac_coords():
    kw = dict(kernel=WrappedNormalKernel(), parameterization="score", pos_key="frac_coords")
    data = crystal()
    out = OrbitNoise(VESchedule(), TorusTranslation(1000), generator=gen(2), **kw)(data)
    assert out.xt.shape == out.target.shape == (5, 3) and out.t.shape == out.ess.shape == (1,)
    assert bool(((out.xt >= 0) & (out.xt < 1)).all()) and bool(torch.isfinite(out.target).all())
    assert 1.0 <= float(out.ess) <= 1000.0
    assert torch.equal(data.frac_coords, crystal().frac_coords)  # input untouched
    assert "pos" not in out  # nothing written under the default position key
    # plain: the wrapped-normal score of the noise itself
    plain = OrbitNoise(VESchedule(), mode="plain", generator=gen(2), **kw)(data)
    sigma = VESchedule().sigma(plain.t.double()).view(1, 1)
    torch.testing.assert_close(plain.target, WrappedNormalKernel().score(plain.xt, plain.x0, None, sigma), rtol=1e-12, atol=1e-12)
    # the batch of per-sample results
    batch = Batch.from_data_list([OrbitNoise(VESchedule(), TorusTranslation(200), generator=gen(s), **kw)(crystal(n, s)) for s, n in enumerate((5, 3, 8))])
    assert batch.t.shape == batch.ess.shape == (3,) and batch.cell.shape == (3, 3, 3) and batch.target.shape == (16, 3)


def test_crystal_orbit_target_matches_quadrature():
    sched = VESchedule(0.05, 0.3, num_steps=3)  # sigma in {0.05, 0.12, 0.3}
    kw = dict(kernel=WrappedNormalKernel(), parameterization="score", pos_key="frac_coords")
    noise = BatchedOrbitNoise(sched, TorusTranslation(1000, proposal="guided"), generator=gen(1), **kw)
    datas = [crystal(n, s) for s, n in enumerate((5, 5, 3, 8, 2))]
    worst = 0.0
    for _ in range(2):
        out = noise(Batch.from_data_list(datas))
        sigma = sched.sigma(out.t.double())
        exact = _torus_exact(out.xt, out.x0, sigma, out.batch, out.num_graphs)
        err = ((out.target - exact).abs() * sigma[out.batch].view(-1, 1)).max()  # in units of 1 / sigma
        single = ((out.target - WrappedNormalKernel().score(out.xt, out.x0, None, sigma[out.batch].view(-1, 1))).abs()
                  * sigma[out.batch].view(-1, 1)).max()
        assert single > 0.5  # the orbit average is far from the single-sample score ...
        worst = max(worst, float(err))
    assert worst < 0.15  # ... and close to the exact posterior mean (guided proposal, K = 1000)
