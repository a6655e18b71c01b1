"""CSPNet (integrations/crystal/model.py): shapes, symmetries, batching, edges, gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch, Data


from orbit_pyg.integrations.crystal.model import CSPNet, fourier_features, fully_connected_edges
from orbit_pyg.nn import time_embedding

SIZES = [1, 5, 7]


def make_crystals(sizes=SIZES, seed: int = 0, dtype=torch.float64) -> Batch:
    g = torch.Generator().manual_seed(seed)
    datas = []
    for n in sizes:
        z = torch.randint(1, 90, (n,), generator=g)
        frac = torch.rand(n, 3, generator=g, dtype=dtype)
        cell = 3.0 * torch.eye(3, dtype=dtype) + 0.8 * torch.randn(3, 3, generator=g, dtype=dtype)
        datas.append(Data(z=z, frac_coords=frac, cell=cell.unsqueeze(0), num_nodes=n))
    return Batch.from_data_list(datas)


def small_net(seed: int = 0, **kw) -> CSPNet:
    torch.manual_seed(seed)
    kw = {"hidden": 32, "num_layers": 2, "n_freq": 5, "time_dim": 16, **kw}
    return CSPNet(**kw).double()


def times(b: int) -> torch.Tensor:
    return torch.linspace(0.1, 0.9, b, dtype=torch.float64)


def orthogonal(seed: int, reflect: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


def run(net, data, frac=None, cell=None, t=None):
    frac = data.frac_coords if frac is None else frac
    cell = data.cell if cell is None else cell
    t = times(data.num_graphs) if t is None else t
    return net.forward_batch(data, frac, cell, t)


def test_shapes_ragged_batch_and_dtypes():
    data = make_crystals()
    torch.manual_seed(0)
    net = CSPNet(hidden=32, num_layers=2, n_freq=4, time_dim=16)  # float32 parameters
    lat, coord = net(data.z, data.frac_coords.float(), data.cell.float(), times(3).float(), data.batch, 3)
    assert lat.shape == (3, 3, 3) and coord.shape == (13, 3)
    assert lat.dtype == coord.dtype == torch.float32
    assert torch.isfinite(lat).all() and torch.isfinite(coord).all()
    # float64 inputs on a float32 model: computed in float32, returned in the inputs' dtype
    lat64, coord64 = net.forward_batch(data, data.frac_coords, data.cell, times(3))
    assert lat64.dtype == coord64.dtype == torch.float64
    torch.testing.assert_close(coord64.float(), coord, rtol=1e-4, atol=1e-5)
    # a float64 model runs in float64 end to end
    lat_d, coord_d = run(net.double(), data)
    assert lat_d.dtype == torch.float64
    torch.testing.assert_close(coord_d.float(), coord, rtol=1e-3, atol=1e-4)


def test_gram_mode_rotation_invariance_and_lattice_equivariance():
    data = make_crystals()
    net = small_net()
    lat, coord = run(net, data)
    for seed, reflect in [(1, False), (2, True)]:
        rot = orthogonal(seed, reflect)
        cell_r = data.cell @ rot.T  # every lattice row v -> R v; Gram matrix unchanged
        lat_r, coord_r = run(net, data, cell=cell_r)
        torch.testing.assert_close(coord_r, coord, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(lat_r, lat @ rot.T, rtol=1e-9, atol=1e-10)
    # the outputs are not trivially constant: lattice_out moved with the rotation
    assert (lat_r - lat).abs().max() > 1e-3


def test_fixed_basis_mode_is_not_rotation_invariant():
    data = make_crystals()
    net = small_net(lattice_input="fixed_basis")
    lat, coord = run(net, data)
    rot = orthogonal(1, False)
    lat_r, coord_r = run(net, data, cell=data.cell @ rot.T)
    assert (coord_r - coord).abs().max() > 1e-4
    assert (lat_r - lat @ rot.T).abs().max() > 1e-4
    assert (lat_r - lat).abs().max() > 1e-4


def test_periodic_translation_invariance():
    data = make_crystals()
    net = small_net()
    lat, coord = run(net, data)
    g = torch.Generator().manual_seed(3)
    shift = torch.rand(data.num_graphs, 3, generator=g, dtype=torch.float64)[data.batch]
    lat_s, coord_s = run(net, data, frac=(data.frac_coords + shift) % 1.0)
    torch.testing.assert_close(coord_s, coord, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(lat_s, lat, rtol=1e-8, atol=1e-9)
    # integer shifts of single atoms (the same crystal, unwrapped coordinates) change nothing either
    jump = torch.randint(-2, 3, data.frac_coords.shape, generator=g).double()
    lat_j, coord_j = run(net, data, frac=data.frac_coords + jump)
    torch.testing.assert_close(coord_j, coord, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(lat_j, lat, rtol=1e-8, atol=1e-9)


def test_permutation_equivariance_within_crystals():
    data = make_crystals()
    net = small_net()
    lat, coord = run(net, data)
    g = torch.Generator().manual_seed(4)
    perm = torch.cat([
        int(data.ptr[b]) + torch.randperm(int(data.ptr[b + 1] - data.ptr[b]), generator=g)
        for b in range(data.num_graphs)
    ])
    assert not torch.equal(perm, torch.arange(perm.numel()))
    lat_p, coord_p = net(data.z[perm], data.frac_coords[perm], data.cell, times(3), data.batch, 3)
    torch.testing.assert_close(coord_p, coord[perm], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lat_p, lat, rtol=1e-9, atol=1e-10)


def test_basis_relabelling_is_not_a_symmetry_of_cspnet():
    """EquiCSP: L -> P L, F -> F P^T is the same crystal, yet CSPNet's outputs are not related by P."""
    data = make_crystals()
    net = small_net()
    lat, coord = run(net, data)
    perm = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    cell_p, frac_p = perm @ data.cell, data.frac_coords @ perm.T
    # Cartesian positions are unchanged by the relabelling
    torch.testing.assert_close(frac_p.unsqueeze(1) @ cell_p[data.batch], data.frac_coords.unsqueeze(1) @ data.cell[data.batch])
    lat_p, coord_p = run(net, data, frac=frac_p, cell=cell_p)
    assert (coord_p - coord @ perm.T).abs().max() > 1e-4


def test_batching_consistency():
    data = make_crystals([1, 5, 7, 2])
    net = small_net()
    t = times(4)
    lat, coord = run(net, data, t=t)
    for b in range(data.num_graphs):
        one = data.get_example(b)
        sl = slice(int(data.ptr[b]), int(data.ptr[b + 1]))
        lat_b, coord_b = net(one.z, one.frac_coords, one.cell, t[b : b + 1])  # batch=None: one crystal
        torch.testing.assert_close(coord_b, coord[sl], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(lat_b, lat[b : b + 1], rtol=1e-9, atol=1e-10)


def brute_force_edges(ptr, self_loops):
    rows, cols, graphs = [], [], []
    for b in range(len(ptr) - 1):
        for i in range(int(ptr[b]), int(ptr[b + 1])):
            for j in range(int(ptr[b]), int(ptr[b + 1])):
                if self_loops or i != j:
                    rows.append(i), cols.append(j), graphs.append(b)
    return torch.tensor([rows, cols], dtype=torch.long).view(2, -1), torch.tensor(graphs, dtype=torch.long)


@pytest.mark.parametrize("self_loops", [True, False])
@pytest.mark.parametrize("sizes", [[1, 5, 7], [3, 0, 1, 1, 4], [2]])
def test_edges_match_brute_force(sizes, self_loops):
    ptr = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0).tolist()))
    ei, eg = fully_connected_edges(ptr, self_loops)
    ref_ei, ref_eg = brute_force_edges(ptr, self_loops)
    assert torch.equal(ei, ref_ei) and torch.equal(eg, ref_eg)
    assert ei.size(1) == sum(n * n if self_loops else n * (n - 1) for n in sizes)


def test_matches_explicit_diffcsp_style_reference():
    """Forward equals a per-crystal loop with the literal concatenation [h_i, h_j, L L^T, fourier]."""
    data = make_crystals([1, 4, 3])
    net = small_net(num_layers=3)
    t = times(3)
    lat, coord = run(net, data, t=t)
    k = torch.arange(1, net.n_freq + 1, dtype=torch.float64)
    for b in range(data.num_graphs):
        sl = slice(int(data.ptr[b]), int(data.ptr[b + 1]))
        z, f, cell = data.z[sl], data.frac_coords[sl], data.cell[b]
        n = z.numel()
        gram = (cell @ cell.T).reshape(9)
        temb = time_embedding(t[b : b + 1], net.time_dim).double().expand(n, -1)
        h = net.atom_time(torch.cat([net.species(z), temb], dim=-1))
        d = (f.unsqueeze(0) - f.unsqueeze(1)) % 1.0  # d[i, j] = f_j - f_i
        ang = 2 * math.pi * d.unsqueeze(-1) * k  # [n, n, 3, K]
        four = torch.cat([ang.reshape(n, n, -1).sin(), ang.reshape(n, n, -1).cos()], dim=-1)
        for layer in net.layers:
            x = layer.norm(h)
            e_in = torch.cat([x.unsqueeze(1).expand(n, n, -1), x.unsqueeze(0).expand(n, n, -1),
                              gram.expand(n, n, 9), four], dim=-1)
            m = F.silu(layer.edge_out(F.silu(layer.edge_in(e_in))))
            h = h + layer.node_mlp(torch.cat([x, m.mean(dim=1)], dim=-1))
        h = net.final_norm(h)
        torch.testing.assert_close(coord[sl], net.coord_head(h), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(lat[b], net.lattice_head(h.mean(0)).view(3, 3) @ cell, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("self_loops", [True, False])
def test_single_atom_crystals_are_finite(self_loops):
    data = make_crystals([1, 1, 1])
    net = small_net(self_loops=self_loops)
    lat, coord = run(net, data)
    assert torch.isfinite(lat).all() and torch.isfinite(coord).all()
    # same frac for a 1-atom crystal anywhere: only differences enter
    lat2, coord2 = run(net, data, frac=torch.rand(3, 3, dtype=torch.float64))
    torch.testing.assert_close(coord2, coord)


@pytest.mark.parametrize("lattice_input", ["gram", "fixed_basis"])
def test_gradient_reaches_every_parameter(lattice_input):
    data = make_crystals()
    net = small_net(lattice_input=lattice_input)
    lat, coord = run(net, data)
    (lat.pow(2).sum() + coord.pow(2).sum()).backward()
    for name, p in net.named_parameters():
        if name == "species.weight":
            used = data.z.unique()
            assert p.grad[used].abs().sum(-1).gt(0).all(), name
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name


def test_time_enters_the_output():
    data = make_crystals()
    net = small_net()
    _, c1 = run(net, data, t=torch.full((3,), 0.2, dtype=torch.float64))
    _, c2 = run(net, data, t=torch.full((3,), 0.7, dtype=torch.float64))
    assert (c1 - c2).abs().max() > 1e-4
    _, c3 = run(net, data, t=0.2)  # scalar broadcast
    torch.testing.assert_close(c3, c1)


def test_fourier_features_are_periodic():
    g = torch.Generator().manual_seed(5)
    d = torch.rand(6, 3, generator=g, dtype=torch.float64) * 4 - 2
    a, b = fourier_features(d, 7), fourier_features(d + torch.randint(-3, 4, (6, 3), generator=g), 7)
    assert a.shape == (6, 42)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:, 0], torch.sin(2 * math.pi * d[:, 0]))  # k = 1, x-coordinate


def test_bad_inputs_raise_clear_errors():
    data = make_crystals()
    net = small_net()
    with pytest.raises(ValueError, match="cell_t"):
        net(data.z, data.frac_coords, data.cell[:2], times(3), data.batch, 3)
    with pytest.raises(ValueError, match="frac_t"):
        net(data.z, data.frac_coords[:, :2], data.cell, times(3), data.batch, 3)
    with pytest.raises(ValueError, match="z"):
        net(data.z + 200, data.frac_coords, data.cell, times(3), data.batch, 3)
    with pytest.raises(ValueError, match="`t`"):
        net(data.z, data.frac_coords, data.cell, times(2), data.batch, 3)
    with pytest.raises(ValueError, match="lattice_input"):
        CSPNet(lattice_input="cartesian")


@pytest.mark.parametrize("lattice_input", ["gram", "fixed_basis"])
def test_encode_is_the_trunk_forward_reads(lattice_input):
    """CSPNet.encode gives exactly (bitwise) the features the heads of forward read, conditioned or not."""
    from torch_geometric.utils import scatter

    data = make_crystals()
    b = data.num_graphs
    for cond_dim in (0, 3):
        net = small_net(lattice_input=lattice_input, cond_dim=cond_dim)
        kw = {}
        if cond_dim:
            torch.nn.init.normal_(net.cond_film.weight, std=0.3)
            kw = {"cond": torch.randn(b, cond_dim, dtype=torch.float64)}
        h = net.encode(data.z, data.frac_coords, data.cell, times(b), data.batch, b, **kw)
        lat, coord = net(data.z, data.frac_coords, data.cell, times(b), data.batch, b, **kw)
        assert h.shape == (data.num_nodes, net.hidden)
        assert torch.equal(net.coord_head(h), coord)
        m = net.lattice_head(scatter(h, data.batch, dim=0, dim_size=b, reduce="mean")).view(b, 3, 3)
        assert torch.equal(m @ data.cell if lattice_input == "gram" else m, lat)
        if cond_dim:  # the condition enters the trunk
            assert (net.encode(data.z, data.frac_coords, data.cell, times(b), data.batch, b) - h).abs().max() > 1e-6
