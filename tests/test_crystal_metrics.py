"""CSP evaluation: validity gate, match rate / RMSE (DiffCSP protocol), METRe and cRMSE, result files."""
from __future__ import annotations

import csv
import json
import os
import pathlib

import numpy as np
import pytest
import torch

pytest.importorskip("pymatgen")
pytest.importorskip("smact")

from pymatgen.core import Lattice, Structure  # noqa: E402
from torch_geometric.data import Batch  # noqa: E402

from orbit_pyg.integrations.crystal import (  # noqa: E402
    as_structure,
    composition_validity,
    crystal_to_data,
    crystal_validity,
    csp_metrics,
    make_matcher,
    rms_dist,
    structure_to_data,
    structure_validity,
    write_csp_results,
)

from _reference import PEROV_CSV  # noqa: E402

PEROVSKITE_FRAC = [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]]


def perovskite(a: float = 3.9, species=("Sr", "Ti", "O", "O", "O")) -> Structure:
    """Cubic ABO3: A at the corner, B at the body centre, O at the face centres around B."""
    return Structure(Lattice.cubic(a), list(species), PEROVSKITE_FRAC)


def anti_perovskite(a: float = 3.9) -> Structure:
    """The same composition with A and B swapped: A octahedrally coordinated, a different crystal."""
    return Structure(Lattice.cubic(a), ["Ti", "Sr", "O", "O", "O"], PEROVSKITE_FRAC)


def perturbed(s: Structure, scale: float, seed: int = 0) -> Structure:
    rng = np.random.default_rng(seed)
    return Structure(s.lattice, s.species, s.cart_coords + scale * rng.standard_normal((len(s), 3)), coords_are_cartesian=True)


@pytest.fixture(scope="module")
def perov_valid() -> list[Structure]:
    if not PEROV_CSV.is_file():
        pytest.skip(f"Perov-5 CSV not found at {PEROV_CSV}")
    out = []
    with open(PEROV_CSV, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            s = Structure.from_str(row["cif"], fmt="cif")
            if crystal_validity(s).valid:
                out.append(s)
            if len(out) == 12:
                break
    return out


# ------------------------------------------------------------------------------------------------
# validity


def test_composition_validity_known_cases():
    assert composition_validity("SrTiO3")
    assert composition_validity("NaCl")
    assert not composition_validity("NaCl2")  # no neutral assignment
    assert not composition_validity("KF2")  # K +1, F -1 only
    assert composition_validity("Cu3Au")  # all metals: an alloy
    assert not composition_validity("Cu3Au", include_alloys=False)
    assert composition_validity("Fe")  # one element
    assert composition_validity(perovskite()) and composition_validity({"Na": 2, "Cl": 2})


def test_composition_validity_loop_equals_smact_api_on_perov5_formulas():
    if not PEROV_CSV.is_file():
        pytest.skip("Perov-5 CSV absent")
    with open(PEROV_CSV, newline="", encoding="utf-8") as f:
        formulas = sorted({row["formula"] for row in csv.DictReader(f)})[:600]
    api = [composition_validity(fm) for fm in formulas]
    loop = [composition_validity(fm, implementation="loop") for fm in formulas]
    assert api == loop
    assert 0 < sum(not v for v in api) < len(api)  # both verdicts occur


def test_structure_validity_distance_and_volume():
    s = perovskite()
    assert structure_validity(s)
    too_close = Structure(Lattice.cubic(3.9), s.species, [[0, 0, 0], [0.1, 0, 0]] + PEROVSKITE_FRAC[2:])
    assert not structure_validity(too_close)  # Sr-Ti at 0.39 Å
    assert structure_validity(too_close, cutoff=0.3)
    # periodic images count: two atoms 0.2 Å apart across the cell boundary
    across = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0.01, 0, 0], [0.99, 0, 0]])
    assert not structure_validity(across)
    tiny = Structure(Lattice.cubic(0.4), ["Fe"], [[0, 0, 0]])  # volume 0.064 Å^3
    assert not structure_validity(tiny)
    assert structure_validity(Structure(Lattice.cubic(0.5), ["Fe"], [[0, 0, 0]]))  # a single atom: no pair
    assert not crystal_validity(None).valid
    v = crystal_validity(too_close)
    assert v.composition and not v.structure and not v.valid


# ------------------------------------------------------------------------------------------------
# match rate and RMSE


def test_structure_matches_itself(perov_valid):
    m = csp_metrics(perov_valid, perov_valid)
    assert m["match_rate"] == 1.0 and m["n_matched"] == len(perov_valid)
    assert m["rmse"] < 1e-8 and m["crmse"] < 1e-8
    assert m["metre"] == 1.0
    assert m["valid_generated"] == m["valid_reference"] == 1.0


def test_rigid_translation_and_relabelled_basis_match_with_zero_rms(perov_valid):
    s = perov_valid[0]
    shifted = Structure(s.lattice, s.species, s.frac_coords + np.array([0.31, 0.62, 0.17]))
    assert rms_dist(shifted, s) < 1e-8
    perm = [2, 0, 1]  # L -> P L, F -> F P^T: the same crystal
    relabelled = Structure(Lattice(s.lattice.matrix[perm]), s.species, s.frac_coords[:, perm])
    np.testing.assert_allclose(relabelled.cart_coords, s.cart_coords, atol=1e-10)
    assert rms_dist(relabelled, s) < 1e-8


def test_perturbed_copy_matches_with_small_rmse_growing_with_noise(perov_valid):
    refs = perov_valid[:8]
    rmse = []
    for scale in (0.01, 0.05, 0.1):
        m = csp_metrics([perturbed(s, scale, seed=i) for i, s in enumerate(refs)], refs)
        assert m["match_rate"] == 1.0
        rmse.append(m["rmse"])
    assert 0 < rmse[0] < rmse[1] < rmse[2] < 0.1
    # pymatgen's definition: rms of the site displacements after the best rigid translation
    # (mean displacement removed), divided by (V/N)^(1/3)
    s = refs[0]
    disp = np.zeros((len(s), 3))
    disp[0] = [0.05, 0, 0]
    moved = Structure(s.lattice, s.species, s.cart_coords + disp, coords_are_cartesian=True)
    centred = disp - disp.mean(0)
    expected = np.sqrt((centred ** 2).sum(1).mean()) / (s.volume / len(s)) ** (1 / 3)
    assert rms_dist(moved, s) == pytest.approx(expected, rel=1e-3)


def test_wrong_composition_does_not_match():
    ref = perovskite()
    wrong = perovskite(species=("Ba", "Ti", "O", "O", "O"))
    assert composition_validity(wrong)
    m = csp_metrics([wrong], [ref])
    assert m["match_rate"] == 0.0 and m["rmse"] is None
    assert m["crmse"] == pytest.approx(0.5)
    assert m["n_structure_matcher_calls"] == 0  # different reduced formulas are never compared
    assert rms_dist(wrong, ref) is None


def test_invalid_structures_are_rejected_by_the_validity_gate():
    ref = perovskite(3.9)
    squashed = perovskite(0.6)  # the same crystal up to scale, but O-Ti at 0.3 Å
    assert not structure_validity(squashed)
    assert rms_dist(squashed, ref) == pytest.approx(0.0, abs=1e-8)  # StructureMatcher rescales volume
    gated = csp_metrics([squashed], [ref])
    assert gated["match_rate"] == 0.0 and gated["valid_generated"] == 0.0
    ungated = csp_metrics([squashed], [ref], require_valid=False)
    assert ungated["match_rate"] == 1.0
    # an invalid reference never matches either (DiffCSP needs both valid)
    bad_ref = Structure(Lattice.cubic(3.9), ["Na", "Cl", "Cl"], [[0, 0, 0], [.5, .5, .5], [0, .5, .5]])
    assert not composition_validity(bad_ref)
    assert csp_metrics([bad_ref], [bad_ref])["match_rate"] == 0.0
    assert csp_metrics([bad_ref], [bad_ref], require_valid=False)["match_rate"] == 1.0


def test_failed_samples_and_data_inputs():
    ref = perovskite()
    nan_sample = crystal_to_data([38, 22, 8, 8, 8], PEROVSKITE_FRAC, 3.9 * np.eye(3))
    nan_sample.cell = torch.full((1, 3, 3), float("nan"))
    assert as_structure(nan_sample) is None
    m = csp_metrics([nan_sample, None], [ref, ref])
    assert m["match_rate"] == 0.0 and m["valid_generated"] == 0.0
    # a Batch of generated Data (float32) against Structures gives the same result as Structures
    gen = [perturbed(ref, 0.03, seed=k) for k in range(3)]
    batch = Batch.from_data_list([structure_to_data(g) for g in gen])
    a = csp_metrics(batch, [ref] * 3)
    b = csp_metrics(gen, [ref] * 3)
    assert a["match_rate"] == b["match_rate"] == 1.0
    assert a["rmse"] == pytest.approx(b["rmse"], abs=1e-5)


def test_k_samples_take_the_best_match():
    ref = perovskite()
    far, near = perturbed(ref, 0.08, seed=1), perturbed(ref, 0.01, seed=2)
    m = csp_metrics([[anti_perovskite(), far, near]], [ref])
    assert m["n_samples"] == 3 and m["match_rate"] == 1.0
    assert m["rmse"] == pytest.approx(rms_dist(near, ref))
    assert m["rmse"] < rms_dist(far, ref)


# ------------------------------------------------------------------------------------------------
# METRe and cRMSE


def test_metre_and_crmse_on_a_hand_made_case():
    r1, r2 = perovskite(), anti_perovskite()
    assert rms_dist(r1, r2) is None and rms_dist(r2, r1) is None  # two polymorphs of SrTiO3
    r3 = Structure(Lattice.cubic(5.64), ["Na"] * 4 + ["Cl"] * 4,
                   [[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0], [.5, .5, .5], [.5, 0, 0], [0, .5, 0], [0, 0, .5]])
    cscl = Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])  # NaCl in the CsCl structure
    assert crystal_validity(cscl).valid and rms_dist(cscl, r3) is None
    g1 = r2.copy()  # generated for r1, but it is r2
    g2 = perturbed(r1, 0.03, seed=3)  # generated for r2, but it is (close to) r1
    g3 = cscl  # generated for r3: right composition, wrong structure
    m = csp_metrics([g1, g2, g3], [r1, r2, r3])
    # paired protocol: nothing matches its own reference
    assert m["match_rate"] == 0.0 and m["rmse"] is None and m["crmse"] == pytest.approx(0.5)
    # METRe: r1 is found by g2, r2 by g1, r3 by nobody
    d12 = rms_dist(g2, r1)
    assert d12 is not None and d12 > 0
    assert m["metre"] == pytest.approx(2 / 3) and m["n_metre_matched"] == 2
    assert m["metre_rmse"] == pytest.approx((d12 + 0.0) / 2)
    assert m["metre_crmse"] == pytest.approx((d12 + 0.0 + 0.5) / 3)
    assert m["per_reference"]["metre_rms"][2] is None
    # SrTiO3 samples x SrTiO3 references (4) + the paired NaCl comparison (1); no cross-formula calls
    assert m["n_structure_matcher_calls"] == 5
    # cRMSE with a custom stol: unmatched count at that stol
    m2 = csp_metrics([g1, g2, g3], [r1, r2, r3], stol=0.4)
    assert m2["crmse"] == pytest.approx(0.4)


def test_multiprocessing_workers_give_identical_results(perov_valid):
    refs = perov_valid[:6]
    gen = [perturbed(s, 0.04, seed=10 + i) for i, s in enumerate(refs)]
    one = csp_metrics(gen, refs, workers=1)
    two = csp_metrics(gen, refs, workers=2)
    assert one == two


def test_matcher_defaults_are_diffcsp():
    m = make_matcher()
    assert (m.stol, m.angle_tol, m.ltol) == (0.5, 10.0, 0.3)
    assert csp_metrics([perovskite()], [perovskite()])["matcher"] == {"stol": 0.5, "angle_tol": 10.0, "ltol": 0.3}


# ------------------------------------------------------------------------------------------------
# writing


def test_write_csp_results_cifs_and_json(tmp_path):
    ref = perovskite()
    gen = [perturbed(ref, 0.02), None, [ref, anti_perovskite()]]
    refs = [ref, ref, ref]
    metrics = csp_metrics(gen, refs)
    metrics["extra_nan"] = float("nan")
    out = write_csp_results(tmp_path / "run", gen, metrics, names=["mp-1", "mp/2", "mp 3"], references=refs)
    names = sorted(os.path.basename(p) for p in out["generated"])
    assert names == ["mp-1.cif", "mp_3_0.cif", "mp_3_1.cif"]
    assert out["missing"] == ["mp_2"]
    assert len(out["references"]) == 3
    back = Structure.from_file(out["generated"][0])
    assert rms_dist(back, gen[0]) < 1e-4
    payload = json.loads(pathlib.Path(out["metrics"]).read_text())
    assert payload["metrics"]["match_rate"] == pytest.approx(metrics["match_rate"])
    assert payload["metrics"]["extra_nan"] is None
    assert payload["files"]["missing"] == ["mp_2"]
    leftovers = [p for p in pathlib.Path(tmp_path).rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    with pytest.raises(ValueError, match="names"):
        write_csp_results(tmp_path / "x", gen, metrics, names=["a"])
