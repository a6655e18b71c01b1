r"""Crystal structure prediction (CSP) metrics: the DiffCSP protocol, METRe and cRMSE.

**DiffCSP / CDVAE protocol** (one generated sample per test structure):

* validity of a crystal = composition validity (SMACT charge balance with the Pauling
  electronegativity test; single-element and all-metal compositions pass) **and** structural
  validity (every interatomic distance ``>= 0.5`` Å under periodic boundary conditions, volume
  ``>= 0.1`` Å³);
* a test structure counts as matched when its sample and itself are both valid and
  ``StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3).get_rms_dist(sample, reference)`` is not
  ``None``;
* ``match_rate = #matched / #references``; ``rmse`` = mean over matched references of the first
  value of ``get_rms_dist`` (pymatgen already divides it by ``(V / N)^(1/3)``).

With ``k`` samples per reference a reference matches when any of its samples does, and its RMS is
the smallest over its matching samples (DiffCSP's multi-sample evaluation).

**METRe and cRMSE** (arXiv 2509.12178, as summarized in the project's ANCHORS.md):

* METRe: every reference is matched against *all* valid generated structures (not only its own
  samples); ``metre = #references matched by any generated structure / #references``. Only pairs
  with the same reduced formula are compared: ``StructureMatcher`` can never match different
  reduced compositions, so this restriction is exact and turns an ``n^2`` scan into a few
  comparisons per composition.
* cRMSE: the RMSE over *all* references, an unmatched reference counting as ``stol``:
  ``crmse = (sum_matched rms + (n - n_matched) * stol) / n``. Reported for the paired protocol
  (``crmse``) and for METRe (``metre_crmse``).

SMACT: the default ``oxidation_states_set="smact14"`` is the oxidation-state table CDVAE and
DiffCSP used (smact 2.x ``Element.oxidation_states``); smact >= 3 defaults to ICSD-24 states,
which changes a few verdicts. ``smact.screening.smact_validity`` is called when it accepts
``oxidation_states_set``; otherwise an equivalent re-implementation of CDVAE's loop runs.

StructureMatcher calls are per pair and in Python; ``workers > 1`` spreads them over processes.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import json
import math
import os
import os.path as osp
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from math import gcd
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from torch_geometric.data import Batch, Data

from .convert import CrystalConversionError, _check_cell, data_to_structure
from orbit_pyg.io import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Composition, Structure

__all__ = [
    "DIFFCSP_MATCHER",
    "Validity",
    "make_matcher",
    "composition_validity",
    "structure_validity",
    "crystal_validity",
    "rms_dist",
    "csp_metrics",
    "write_csp_results",
    "as_structure",
]

#: DiffCSP's StructureMatcher tolerances.
DIFFCSP_MATCHER = {"stol": 0.5, "angle_tol": 10.0, "ltol": 0.3}


def make_matcher(stol: float = 0.5, angle_tol: float = 10.0, ltol: float = 0.3) -> "StructureMatcher":
    """``pymatgen StructureMatcher(stol, angle_tol, ltol)`` with DiffCSP's defaults.

    Example:
        >>> m = make_matcher(); (m.stol, m.angle_tol, m.ltol)
        (0.5, 10.0, 0.3)
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(stol=stol, angle_tol=angle_tol, ltol=ltol)


# ------------------------------------------------------------------------------------------------
# validity


def _composition_key(composition: Any) -> tuple[tuple[str, int], ...]:
    """``(symbol, count)`` pairs with counts divided by their gcd (the order CDVAE uses: sorted)."""
    from pymatgen.core import Composition, Structure

    if isinstance(composition, Structure):
        composition = composition.composition
    elif isinstance(composition, str):
        composition = Composition(composition)
    elif isinstance(composition, dict):
        composition = Composition(composition)
    if not isinstance(composition, Composition):
        raise TypeError(f"expected a Structure, Composition, formula or dict, got {type(composition).__name__}")
    el = composition.element_composition
    items = sorted((e.symbol, float(a)) for e, a in el.items())
    counts = []
    for sym, a in items:
        if abs(a - round(a)) > 1e-6 or round(a) < 1:
            raise ValueError(f"composition validity needs whole atom counts, got {sym}: {a}")
        counts.append(int(round(a)))
    g = functools.reduce(gcd, counts)
    return tuple((sym, c // g) for (sym, _), c in zip(items, counts))


@functools.lru_cache(maxsize=1)
def _smact_api() -> tuple[Any, bool]:
    """``(smact_validity or None, accepts oxidation_states_set)``."""
    try:
        from smact.screening import smact_validity
    except ImportError:
        return None, False
    return smact_validity, "oxidation_states_set" in inspect.signature(smact_validity).parameters


def _oxidation_states(element: Any, oxidation_states_set: str) -> list[int] | None:
    attr = {"smact14": "oxidation_states_smact14", "icsd16": "oxidation_states_icsd16",
            "icsd24": "oxidation_states_icsd24", "pymatgen_sp": "oxidation_states_sp"}.get(oxidation_states_set)
    if attr is not None and hasattr(element, attr):
        return getattr(element, attr)
    return element.oxidation_states  # smact 2.x: the smact14 table


def _smact_validity_loop(key: tuple[tuple[str, int], ...], use_pauling_test: bool, include_alloys: bool,
                         oxidation_states_set: str) -> bool:
    """CDVAE's ``smact_validity`` loop written against smact's primitives (any smact version)."""
    import smact
    from smact.screening import neutral_ratios, pauling_test

    symbols = tuple(s for s, _ in key)
    counts = [c for _, c in key]
    if len(set(symbols)) == 1:
        return True
    if include_alloys and all(s in smact.metals for s in symbols):
        return True
    space = smact.element_dictionary(symbols)
    elems = [space[s] for s in symbols]
    electronegs = [e.pauling_eneg for e in elems]
    ox_combos = [_oxidation_states(e, oxidation_states_set) for e in elems]
    if any(not ox for ox in ox_combos):
        return False
    threshold = max(counts)
    stoichs = [(c,) for c in counts]
    for ox_states in itertools.product(*ox_combos):
        out = neutral_ratios(ox_states, stoichs=stoichs, threshold=threshold)
        ratios = out[1] if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], bool) else out
        if not ratios:
            continue
        if not use_pauling_test:
            return True
        try:
            if pauling_test(ox_states, electronegs):
                return True
        except TypeError:  # missing electronegativity data: CDVAE accepts
            return True
    return False


@functools.lru_cache(maxsize=1 << 16)
def _composition_validity_cached(key: tuple[tuple[str, int], ...], use_pauling_test: bool, include_alloys: bool,
                                 oxidation_states_set: str, implementation: str) -> bool:
    fn, has_set = _smact_api()
    try:
        if implementation == "smact" and fn is not None and has_set:
            from pymatgen.core import Composition

            return bool(fn(Composition(dict(key)), use_pauling_test=use_pauling_test, include_alloys=include_alloys,
                           oxidation_states_set=oxidation_states_set))
        return _smact_validity_loop(key, use_pauling_test, include_alloys, oxidation_states_set)
    except (KeyError, NameError, ValueError):  # an element smact has no data for
        return False


def composition_validity(
    composition: "Structure | Composition | str | dict",
    *,
    use_pauling_test: bool = True,
    include_alloys: bool = True,
    oxidation_states_set: str = "smact14",
    implementation: str = "smact",
) -> bool:
    r"""SMACT charge-balance validity of a composition (CDVAE / DiffCSP ``smact_validity``).

    Valid when the composition has one element, or only metals (``include_alloys``), or some
    assignment of oxidation states ``q_i`` (from ``oxidation_states_set``) is charge neutral,
    ``sum_i q_i n_i = 0`` with the gcd-reduced counts ``n_i``, and (``use_pauling_test``)
    passes the Pauling test: every cation less electronegative than every anion. Cached per
    reduced composition.

    Args:
        implementation: ``"smact"`` calls ``smact.screening.smact_validity`` when it accepts
            ``oxidation_states_set``; ``"loop"`` always runs the re-implementation.

    Example:
        >>> composition_validity("SrTiO3"), composition_validity("NaCl2"), composition_validity("Cu3Au")
        (True, False, True)
    """
    if implementation not in ("smact", "loop"):
        raise ValueError(f"`implementation` must be 'smact' or 'loop', got {implementation!r}")
    return _composition_validity_cached(_composition_key(composition), bool(use_pauling_test), bool(include_alloys),
                                        str(oxidation_states_set), implementation)


def structure_validity(structure: "Structure", cutoff: float = 0.5, min_volume: float = 0.1) -> bool:
    r"""CDVAE structural validity: ``min_{i != j} d_PBC(i, j) >= cutoff`` (Å) and ``volume >= min_volume`` (Å³).

    ``d_PBC`` is pymatgen's minimum-image ``distance_matrix``; an atom is never compared with its
    own periodic image (as in CDVAE).

    Example:
        >>> from pymatgen.core import Lattice, Structure
        >>> structure_validity(Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]]))
        False
    """
    vol = float(structure.volume)
    if not math.isfinite(vol) or vol < min_volume:
        return False
    if len(structure) < 2:
        return True
    dm = np.array(structure.distance_matrix, dtype=np.float64)
    np.fill_diagonal(dm, np.inf)
    return bool(not np.isnan(dm).any() and dm.min() >= cutoff)


@dataclass(frozen=True)
class Validity:
    """Composition (SMACT) and structural validity of one crystal; ``valid`` needs both."""

    composition: bool
    structure: bool

    @property
    def valid(self) -> bool:
        return self.composition and self.structure


def crystal_validity(structure: "Structure | None", *, cutoff: float = 0.5, min_volume: float = 0.1,
                     **smact_kwargs: Any) -> Validity:
    """:class:`Validity` of a structure (``None`` — a sample that did not convert — is invalid).

    Example:
        >>> from pymatgen.core import Lattice, Structure
        >>> crystal_validity(Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])).valid
        True
    """
    if structure is None:
        return Validity(False, False)
    return Validity(composition_validity(structure, **smact_kwargs), structure_validity(structure, cutoff, min_volume))


# ------------------------------------------------------------------------------------------------
# inputs


def as_structure(obj: Any) -> "Structure | None":
    """A ``Structure`` from a ``Structure``, a crystal ``Data``, a periodic ``ase.Atoms`` or ``None``.

    Returns ``None`` for a crystal that cannot be built (non-finite or singular lattice, NaN
    coordinates): such a sample is invalid, never an exception in the middle of an evaluation.

    Example:
        >>> from orbit_pyg.integrations.crystal.convert import crystal_to_data
        >>> as_structure(crystal_to_data([11], [[0, 0, 0]], np.eye(3) * 3)).formula
        'Na1'
    """
    from pymatgen.core import Lattice, Structure

    if obj is None or isinstance(obj, Structure):
        return obj
    if isinstance(obj, Data):
        try:
            return data_to_structure(obj)
        except CrystalConversionError:
            return None
    if hasattr(obj, "get_scaled_positions") and hasattr(obj, "cell"):  # ase.Atoms
        try:
            if not np.asarray(obj.pbc).all():
                return None
            cell = _check_cell(obj.cell.array)
            frac = np.linalg.solve(cell.T, np.asarray(obj.positions, dtype=np.float64).T).T
            if not np.isfinite(frac).all():
                return None
            return Structure(Lattice(cell), obj.numbers.tolist(), frac)
        except CrystalConversionError:
            return None
    raise TypeError(f"cannot make a Structure from {type(obj).__name__}")


def _as_list(objs: Any) -> list[Any]:
    if isinstance(objs, Data):  # a Batch (or one Data)
        return objs.to_data_list() if isinstance(objs, Batch) else [objs]
    return list(objs)


def _samples(generated: Any, n: int) -> list[list["Structure | None"]]:
    items = _as_list(generated)
    if len(items) != n:
        raise ValueError(f"`generated` has {len(items)} entries but there are {n} references (one entry per reference)")
    out = []
    for it in items:
        if isinstance(it, (list, tuple)) or (isinstance(it, Batch)):
            out.append([as_structure(s) for s in _as_list(it)])
        else:
            out.append([as_structure(it)])
    return out


# ------------------------------------------------------------------------------------------------
# matching


def rms_dist(generated: "Structure | None", reference: "Structure | None",
             matcher: "StructureMatcher | None" = None) -> float | None:
    r"""Normalized RMS displacement ``get_rms_dist(generated, reference)[0]``, or ``None`` when they do not match.

    pymatgen scales both lattices to a common volume and divides the RMS site displacement by
    ``(V / N)^(1/3)``. A matcher exception (degenerate lattice) counts as no match, as in DiffCSP.

    Example:
        >>> from pymatgen.core import Lattice, Structure
        >>> s = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
        >>> rms_dist(s, s)
        0.0
    """
    if generated is None or reference is None:
        return None
    matcher = matcher or make_matcher()
    try:
        out = matcher.get_rms_dist(generated, reference)
    except Exception:  # noqa: BLE001 - DiffCSP counts matcher failures as "no match"
        return None
    return None if out is None else float(out[0])


_WORKER: dict[str, Any] = {}


def _init_worker(structures: list, matcher_kwargs: dict) -> None:
    _WORKER["structures"] = structures
    _WORKER["matcher"] = make_matcher(**matcher_kwargs)


def _rms_chunk(pairs: list[tuple[int, int]]) -> list[float | None]:
    s, m = _WORKER["structures"], _WORKER["matcher"]
    return [rms_dist(s[a], s[b], m) for a, b in pairs]


def _rms_many(structures: list, pairs: list[tuple[int, int]], matcher_kwargs: dict, workers: int,
              progress: bool) -> list[float | None]:
    if not pairs:
        return []
    if workers <= 1 or len(pairs) < 2 * workers:
        matcher = make_matcher(**matcher_kwargs)
        it: Iterable = pairs
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(pairs, desc="StructureMatcher", leave=False)
        return [rms_dist(structures[a], structures[b], matcher) for a, b in it]
    size = max(1, math.ceil(len(pairs) / (workers * 8)))
    chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                             initargs=(structures, matcher_kwargs)) as pool:
        out: list[float | None] = []
        for part in pool.map(_rms_chunk, chunks):
            out.extend(part)
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def csp_metrics(
    generated: Any,
    references: Any,
    *,
    stol: float = 0.5,
    angle_tol: float = 10.0,
    ltol: float = 0.3,
    require_valid: bool = True,
    metre: bool = True,
    workers: int = 1,
    progress: bool = False,
    cutoff: float = 0.5,
    min_volume: float = 0.1,
    **smact_kwargs: Any,
) -> dict[str, Any]:
    r"""Match rate, RMSE, cRMSE, METRe and validity rates of generated crystals against references.

    Args:
        generated: one entry per reference: a ``Structure`` / crystal ``Data`` / ``ase.Atoms`` /
            ``None`` (a failed sample), or a list of those (``k`` samples). A PyG ``Batch`` is
            one sample per graph.
        references: the test crystals (``Structure`` / ``Data`` / ``Atoms``, or a ``Batch``).
        stol, angle_tol, ltol: ``StructureMatcher`` tolerances (DiffCSP: 0.5, 10, 0.3); ``stol``
            is also the cRMSE penalty of an unmatched reference.
        require_valid: a pair counts only when sample and reference are both valid (DiffCSP).
        metre: also compute METRe (every reference against every generated structure of the
            same reduced formula).
        workers: processes for the StructureMatcher calls (``1``: in-process).
        cutoff, min_volume: structural validity thresholds (0.5 Å, 0.1 Å³).
        **smact_kwargs: passed to :func:`composition_validity`.

    Returns:
        A JSON-serializable dict: ``match_rate``, ``rmse`` (``None`` without matches), ``crmse``,
        ``n_references``, ``n_samples`` (per reference, max), ``n_matched``; with ``metre``:
        ``metre``, ``metre_rmse``, ``metre_crmse``, ``n_metre_matched``; validity rates
        ``valid_generated``, ``comp_valid_generated``, ``struct_valid_generated``,
        ``valid_reference``; ``matcher`` (the tolerances); and ``per_reference``: lists ``rms``,
        ``metre_rms`` (``None`` = unmatched), ``reference_valid``, ``generated_valid``.

    Example:
        >>> from pymatgen.core import Lattice, Structure
        >>> s = Structure(Lattice.cubic(4.0), ["Sr", "Ti", "O", "O", "O"],
        ...               [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])
        >>> m = csp_metrics([s], [s]); m["match_rate"], m["rmse"], m["metre"]
        (1.0, 0.0, 1.0)
    """
    refs = [as_structure(r) for r in _as_list(references)]
    n = len(refs)
    gens = _samples(generated, n)
    vkw = dict(cutoff=cutoff, min_volume=min_volume, **smact_kwargs)
    ref_val = [crystal_validity(r, **vkw) for r in refs]
    gen_val = [[crystal_validity(s, **vkw) for s in row] for row in gens]

    # one flat list of structures: references first, then samples
    flat: list[Any] = list(refs)
    gen_flat_id: list[list[int]] = []
    for row in gens:
        gen_flat_id.append(list(range(len(flat), len(flat) + len(row))))
        flat.extend(row)

    def formula(s: Any) -> str | None:
        return None if s is None else s.composition.reduced_formula

    ref_formula = [formula(r) for r in refs]
    usable_ref = [r is not None and (ref_val[i].valid or not require_valid) for i, r in enumerate(refs)]
    usable_gen: list[tuple[int, int, int]] = []  # (reference row, sample, flat id)
    for i, row in enumerate(gens):
        for j, s in enumerate(row):
            if s is not None and (gen_val[i][j].valid or not require_valid):
                usable_gen.append((i, j, gen_flat_id[i][j]))

    # pairs (generated flat id, reference flat id), deduplicated
    pair_ids: dict[tuple[int, int], int] = {}
    pairs: list[tuple[int, int]] = []

    def add(g: int, r: int) -> None:
        if (g, r) not in pair_ids:
            pair_ids[(g, r)] = len(pairs)
            pairs.append((g, r))

    for i, j, g in usable_gen:
        if usable_ref[i] and formula(flat[g]) == ref_formula[i]:
            add(g, i)
    by_formula: dict[str, list[int]] = {}
    if metre:
        for i, j, g in usable_gen:
            by_formula.setdefault(formula(flat[g]), []).append(g)
        for r in range(n):
            if usable_ref[r]:
                for g in by_formula.get(ref_formula[r], []):
                    add(g, r)
    matcher_kwargs = {"stol": stol, "angle_tol": angle_tol, "ltol": ltol}
    rms_all = _rms_many(flat, pairs, matcher_kwargs, workers, progress)

    # paired protocol
    rms_ref: list[float | None] = []
    for i in range(n):
        vals = [rms_all[pair_ids[(g, i)]] for g in gen_flat_id[i] if (g, i) in pair_ids]
        vals = [v for v in vals if v is not None]
        rms_ref.append(min(vals) if vals else None)
    matched = [v for v in rms_ref if v is not None]
    out: dict[str, Any] = {
        "n_references": n,
        "n_samples": max((len(r) for r in gens), default=0),
        "n_matched": len(matched),
        "match_rate": len(matched) / n if n else 0.0,
        "rmse": _mean(matched),
        "crmse": (sum(matched) + (n - len(matched)) * stol) / n if n else None,
    }
    if metre:
        metre_rms: list[float | None] = []
        for r in range(n):
            vals = [rms_all[pair_ids[(g, r)]] for g in by_formula.get(ref_formula[r], []) if (g, r) in pair_ids]
            vals = [v for v in vals if v is not None]
            metre_rms.append(min(vals) if vals else None)
        m_matched = [v for v in metre_rms if v is not None]
        out.update({
            "n_metre_matched": len(m_matched),
            "metre": len(m_matched) / n if n else 0.0,
            "metre_rmse": _mean(m_matched),
            "metre_crmse": (sum(m_matched) + (n - len(m_matched)) * stol) / n if n else None,
        })
    all_gen = [v for row in gen_val for v in row]
    ng = max(len(all_gen), 1)
    out.update({
        "valid_generated": sum(v.valid for v in all_gen) / ng,
        "comp_valid_generated": sum(v.composition for v in all_gen) / ng,
        "struct_valid_generated": sum(v.structure for v in all_gen) / ng,
        "valid_reference": sum(v.valid for v in ref_val) / max(n, 1),
        "n_structure_matcher_calls": len(pairs),
        "matcher": matcher_kwargs,
        "require_valid": require_valid,
        "per_reference": {
            "rms": rms_ref,
            "metre_rms": metre_rms if metre else None,
            "reference_valid": [v.valid for v in ref_val],
            "generated_valid": [[v.valid for v in row] for row in gen_val],
        },
    })
    return out


# ------------------------------------------------------------------------------------------------
# writing


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return name or "crystal"


def _json_clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_csp_results(
    out_dir: str | os.PathLike,
    generated: Any,
    metrics: dict[str, Any] | None = None,
    *,
    names: Sequence[str] | None = None,
    references: Any = None,
) -> dict[str, Any]:
    r"""Write generated crystals as CIFs and the metrics as JSON, every file atomically.

    Layout: ``out_dir/generated/{name}.cif`` (``{name}_{j}.cif`` for the ``j``-th of several
    samples), ``out_dir/references/{name}.cif`` when ``references`` is given, and
    ``out_dir/metrics.json`` (``metrics`` plus the list of files; NaN written as ``null``).
    A sample that does not convert (``None``, singular lattice) is listed under ``"missing"``.

    Args:
        names: one name per entry (e.g. ``material_id``); default ``00000``, ``00001``, ...

    Returns:
        ``{"metrics": path, "generated": [paths], "references": [paths], "missing": [names]}``.

    Example:
        >>> import tempfile
        >>> from pymatgen.core import Lattice, Structure
        >>> s = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
        >>> out = write_csp_results(tempfile.mkdtemp(), [s], {"match_rate": 1.0}, names=["nacl"])
        >>> [p.rsplit("/", 1)[-1] for p in out["generated"]]
        ['nacl.cif']
    """
    from pymatgen.io.cif import CifWriter

    out_dir = os.fspath(out_dir)
    items = _as_list(generated)
    if names is None:
        names = [f"{i:05d}" for i in range(len(items))]
    names = [_safe_name(nm) for nm in names]
    if len(names) != len(items):
        raise ValueError(f"`names` has {len(names)} entries for {len(items)} generated entries")
    written: list[str] = []
    missing: list[str] = []
    for name, it in zip(names, items):
        many = isinstance(it, (list, tuple, Batch))
        samples = _as_list(it) if many else [it]
        for j, s in enumerate(samples):
            tag = f"{name}_{j}" if many else name
            st = as_structure(s)
            if st is None:
                missing.append(tag)
                continue
            path = osp.join(out_dir, "generated", tag + ".cif")
            atomic_write_text(path, str(CifWriter(st)))
            written.append(path)
    ref_written: list[str] = []
    if references is not None:
        refs = _as_list(references)
        if len(refs) != len(names):
            raise ValueError(f"`references` has {len(refs)} entries for {len(names)} names")
        for name, r in zip(names, refs):
            st = as_structure(r)
            if st is None:
                continue
            path = osp.join(out_dir, "references", name + ".cif")
            atomic_write_text(path, str(CifWriter(st)))
            ref_written.append(path)
    mpath = osp.join(out_dir, "metrics.json")
    payload = {"metrics": metrics or {}, "files": {"generated": [osp.relpath(p, out_dir) for p in written],
                                                   "references": [osp.relpath(p, out_dir) for p in ref_written],
                                                   "missing": missing}}
    atomic_write_text(mpath, json.dumps(_json_clean(payload), indent=1, allow_nan=False))
    return {"metrics": mpath, "generated": written, "references": ref_written, "missing": missing}
