r"""CDVAE-format crystal datasets (Perov-5, Carbon-24, MP-20, MPTS-52) as a PyG ``InMemoryDataset``.

A CDVAE CSV has one row per crystal with columns ``material_id``, ``cif`` (a CIF text) and
property columns (Perov-5: ``heat_all``, ``heat_ref``, ``dir_gap``, ``ind_gap``; MP-20:
``formation_energy_per_atom``, ``band_gap``, ...). Each row becomes one crystal graph
(:mod:`.convert` keys: ``z``, ``frac_coords``, ``cell [1,3,3]``, ``pos``, ``lengths``, ``angles``,
``num_atoms``) plus

* ``y`` ``[1, P]``: the numeric property columns, in the order of ``dataset.property_names``
  (an empty cell is NaN);
* one ``[1]`` tensor per property under its own name (when the name is a free identifier);
* ``material_id``: the id as a string (batched into a list).

Preprocessing follows DiffCSP: CIF parsed by pymatgen, Niggli-reduced, lattice rebuilt from its
parameters (``niggli=True, canonical=True``). Rows that fail (unparsable CIF, disordered
sites, more than ``max_atoms`` atoms, a singular lattice) are skipped, logged with a count, and
listed in ``dataset.skipped``; ``dataset.num_skipped`` is the count.

The raw CSV comes from ``source``: ``None`` for CDVAE's canonical URL
(``https://raw.githubusercontent.com/txie-93/cdvae/main/data/{name}/{split}.csv``), any other
``http(s)://`` URL, or a local path (a ``.csv`` file, or a folder holding ``{split}.csv`` or
``{name}/{split}.csv``) for machines without internet. It is copied to ``root/raw/{split}.csv``.
The processed cache ``root/processed/{split}_{key}.pt`` (+ a ``.json`` with the skip report) is
keyed by a hash of the raw file and every processing option, written atomically (temporary
file + ``os.replace``), and reused on the next load.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import os.path as osp
import shutil
import tempfile
import time
import warnings
from collections import Counter
from typing import Callable, NamedTuple, Sequence

import torch
from torch_geometric.data import Data, InMemoryDataset

from orbit_pyg.io import atomic_copy, atomic_save, atomic_write_json

from .convert import CrystalConversionError, structure_to_data

__all__ = ["CDVAEDataset", "CDVAE_URL", "split_indices", "Split", "read_cdvae_csv"]

log = logging.getLogger(__name__)

#: CDVAE's canonical raw files; ``name`` in {perov_5, carbon_24, mp_20, mpts_52}, ``split`` in {train, val, test}.
CDVAE_URL = "https://raw.githubusercontent.com/txie-93/cdvae/main/data/{name}/{split}.csv"

# Columns that are never properties. The unnamed leading column is pandas' saved index.
_NON_PROPERTY = {"", "material_id", "cif", "formula", "elements", "spacegroup.number", "pretty_formula"}
# Keys a property must not overwrite when stored under its own name.
_RESERVED = {
    "z", "frac_coords", "cell", "pos", "lengths", "angles", "num_atoms", "y", "material_id", "x",
    "batch", "ptr", "edge_index", "edge_attr", "num_nodes", "face", "atom_types", "t",
}


# ------------------------------------------------------------------------------------------------
# CSV reading


def _to_float(value: str) -> float | None:
    """A CSV cell as a float; ``""`` → NaN; ``None`` when it is not a number."""
    value = value.strip()
    if value == "" or value.lower() in ("nan", "none", "null"):
        return math.nan
    try:
        return float(value)
    except ValueError:
        return None


def read_cdvae_csv(path: str, properties: Sequence[str] | None = None) -> tuple[list[dict[str, str]], list[str]]:
    r"""Read a CDVAE CSV: rows as dicts and the property columns.

    Properties default to every column other than the id / CIF / formula columns whose
    non-empty cells all parse as numbers. An explicitly requested property must exist and be
    numeric.

    Returns:
        ``(rows, property_names)``.

    Raises:
        ValueError: a missing ``material_id`` / ``cif`` column, or a requested property that is
            absent or not numeric.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.csv"
        >>> _ = p.write_text(',material_id,cif,heat_ref\n0,a,"data_x",1.5\n')
        >>> rows, props = read_cdvae_csv(str(p)); props, rows[0]["material_id"]
        (['heat_ref'], 'a')
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    missing = [c for c in ("material_id", "cif") if c not in columns]
    if missing:
        raise ValueError(f"{path}: a CDVAE CSV needs the columns 'material_id' and 'cif'; missing {missing} (has {columns})")

    def numeric(col: str) -> bool:
        return all(_to_float(r[col] or "") is not None for r in rows)

    if properties is None:
        props = [c for c in columns if c not in _NON_PROPERTY and not c.startswith("Unnamed") and numeric(c)]
    else:
        props = list(properties)
        for c in props:
            if c not in columns:
                raise ValueError(f"{path}: property column {c!r} not found (columns: {columns})")
            if not numeric(c):
                raise ValueError(f"{path}: property column {c!r} is not numeric")
    return rows, props


# ------------------------------------------------------------------------------------------------
# the dataset


def _row_to_data(row: dict[str, str], props: Sequence[str], niggli: bool, canonical: bool,
                 max_atoms: int | None, dtype: torch.dtype) -> Data:
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen warns on rounding of CIF coordinates
            structure = Structure.from_str(row["cif"], fmt="cif")
    except Exception as err:  # noqa: BLE001 - any parser failure is a skip reason
        raise CrystalConversionError(f"CIF does not parse: {type(err).__name__}: {err}", "parse_error") from err
    data = structure_to_data(structure, max_atoms=max_atoms, niggli=niggli, canonical=canonical, dtype=dtype)
    values = [_to_float(row[c] or "") for c in props]
    data.y = torch.tensor([values], dtype=dtype).reshape(1, len(props))
    for j, c in enumerate(props):
        if c.isidentifier() and c not in _RESERVED:
            data[c] = data.y[:, j].clone()
    data.material_id = str(row["material_id"])
    return data


class CDVAEDataset(InMemoryDataset):
    r"""A CDVAE crystal CSV (Perov-5 by default) as a PyG ``InMemoryDataset`` of crystal graphs.

    Args:
        root: dataset folder (``root/raw``, ``root/processed``).
        name: CDVAE dataset name used in the canonical URL (``perov_5``, ``carbon_24``, ``mp_20``,
            ``mpts_52``).
        split: ``train`` / ``val`` / ``test`` (the CSV file's stem).
        source: ``None`` (canonical URL), a URL, or a local CSV file / folder (offline use).
        properties: property columns to keep (default: every numeric non-id column).
        niggli, canonical: DiffCSP cell preprocessing (see :func:`.convert.reduce_structure`).
        max_atoms: skip crystals with more atoms.
        dtype: float dtype of coordinates, cells and properties (default float32).
        limit: process only the first ``limit`` rows (quick experiments).
        progress: show a tqdm bar while processing.
        transform, pre_transform, pre_filter, log, force_reload: as in PyG.

    Attributes:
        property_names: the columns stored in ``y``, in order.
        num_skipped: rows that did not convert; ``skipped`` lists ``{row, material_id, reason,
            message}`` for each; ``skip_reasons`` counts them by reason.
        num_rows: rows in the CSV (or ``limit``); ``processing_seconds``: time the processing took.

    Example:
        >>> ds = CDVAEDataset("data/perov_5", source="../shared/data/perov_5/val.csv")  # doctest: +SKIP
        >>> train_idx, test_idx = split_indices(len(ds), n_test=500, seed=0)          # doctest: +SKIP
        >>> train, test = ds[train_idx], ds[test_idx]                                  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str,
        name: str = "perov_5",
        split: str = "val",
        source: str | os.PathLike | None = None,
        *,
        properties: Sequence[str] | None = None,
        niggli: bool = True,
        canonical: bool = True,
        max_atoms: int | None = None,
        dtype: torch.dtype = torch.float32,
        limit: int | None = None,
        progress: bool = True,
        transform: Callable | None = None,
        pre_transform: Callable | None = None,
        pre_filter: Callable | None = None,
        log: bool = True,
        force_reload: bool = False,
    ) -> None:
        if not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating dtype, got {dtype}")
        if limit is not None and limit < 0:
            raise ValueError(f"`limit` must be >= 0, got {limit}")
        self.name = name
        self.split = split
        self.source = None if source is None else os.fspath(source)
        self.properties_arg = None if properties is None else list(properties)
        self.niggli = bool(niggli)
        self.canonical = bool(canonical)
        self.max_atoms = max_atoms
        self.dtype = dtype
        self.limit = limit
        self.progress = progress
        self._key: str | None = None
        super().__init__(root, transform, pre_transform, pre_filter, log=log, force_reload=force_reload)
        self.load(self.processed_paths[0])
        with open(self.processed_paths[1], encoding="utf-8") as f:
            meta = json.load(f)
        self.meta = meta
        self.property_names: list[str] = meta["property_names"]
        self.skipped: list[dict] = meta["skipped"]
        self.num_skipped: int = len(self.skipped)
        self.skip_reasons: dict[str, int] = meta["skip_reasons"]
        self.num_rows: int = meta["num_rows"]
        self.processing_seconds: float = meta["seconds"]

    # ---- PyG plumbing ----------------------------------------------------------------------------

    @property
    def raw_file_names(self) -> list[str]:
        return [f"{self.split}.csv"]

    def _options_key(self) -> str:
        raw = self.raw_paths[0]
        h = hashlib.sha1()
        opts = {
            "properties": self.properties_arg, "niggli": self.niggli, "canonical": self.canonical,
            "max_atoms": self.max_atoms, "dtype": str(self.dtype), "limit": self.limit,
            "pre_transform": repr(self.pre_transform), "pre_filter": repr(self.pre_filter), "version": 1,
        }
        h.update(json.dumps(opts, sort_keys=True).encode())
        if osp.exists(raw):
            with open(raw, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._key = h.hexdigest()[:12]
            return self._key
        return h.hexdigest()[:12]

    @property
    def processed_file_names(self) -> list[str]:
        key = self._key or self._options_key()
        return [f"{self.split}_{key}.pt", f"{self.split}_{key}.json"]

    def _resolve_source(self) -> str:
        """The URL or local CSV path the raw file comes from."""
        if self.source is None:
            return CDVAE_URL.format(name=self.name, split=self.split)
        src = self.source
        if src.startswith(("http://", "https://")):
            return src
        if osp.isdir(src):
            for cand in (osp.join(src, f"{self.split}.csv"), osp.join(src, self.name, f"{self.split}.csv")):
                if osp.isfile(cand):
                    return cand
            raise FileNotFoundError(f"source folder {src!r} holds neither {self.split}.csv nor {self.name}/{self.split}.csv")
        if osp.isfile(src):
            return src
        raise FileNotFoundError(f"source {src!r} is neither a URL, a CSV file nor a folder")

    def download(self) -> None:
        src = self._resolve_source()
        dst = self.raw_paths[0]
        if src.startswith(("http://", "https://")):
            from torch_geometric.data import download_url

            tmp_dir = tempfile.mkdtemp(dir=self.raw_dir)
            try:
                path = download_url(src, tmp_dir, log=self.log, filename=osp.basename(dst))
                os.replace(path, dst)
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)
        else:
            atomic_copy(src, dst)

    def process(self) -> None:
        from tqdm.auto import tqdm

        start = time.perf_counter()
        rows, props = read_cdvae_csv(self.raw_paths[0], self.properties_arg)
        if self.limit is not None:
            rows = rows[: self.limit]
        data_list: list[Data] = []
        skipped: list[dict] = []
        label = f"{self.name}/{self.split}"
        for i, row in enumerate(tqdm(rows, desc=f"CIF -> graph ({label})", disable=not self.progress, leave=False)):
            try:
                data = _row_to_data(row, props, self.niggli, self.canonical, self.max_atoms, self.dtype)
            except CrystalConversionError as err:
                skipped.append({"row": i, "material_id": row.get("material_id"), "reason": err.reason, "message": str(err)})
                continue
            if self.pre_filter is not None and not self.pre_filter(data):
                skipped.append({"row": i, "material_id": row.get("material_id"), "reason": "pre_filter", "message": ""})
                continue
            if self.pre_transform is not None:
                data = self.pre_transform(data)
            data_list.append(data)
        if not data_list:
            raise ValueError(f"{label}: none of the {len(rows)} rows converted ({Counter(s['reason'] for s in skipped)})")
        reasons = dict(Counter(s["reason"] for s in skipped))
        seconds = time.perf_counter() - start
        meta = {
            "name": self.name, "split": self.split, "num_rows": len(rows), "num_graphs": len(data_list),
            "property_names": props, "skipped": skipped, "skip_reasons": reasons, "seconds": seconds,
        }
        if skipped:
            log.warning("%s: skipped %d of %d structures (%s); see dataset.skipped", label, len(skipped), len(rows), reasons)
        else:
            log.info("%s: converted all %d structures in %.1f s", label, len(rows), seconds)
        data, slices = self.collate(data_list)
        atomic_write_json(self.processed_paths[1], meta, indent=1)
        atomic_save((data.to_dict(), slices, data.__class__), self.processed_paths[0])

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.name}/{self.split}, {len(self)} crystals, skipped={getattr(self, 'num_skipped', '?')})"


# ------------------------------------------------------------------------------------------------
# splits


class Split(NamedTuple):
    """Index tensors of a train / held-out split (sorted, disjoint, covering ``range(n)``)."""

    train: torch.Tensor
    test: torch.Tensor


def split_indices(n: int, n_test: int = 500, seed: int = 0) -> Split:
    r"""A fixed, seeded random split of ``range(n)`` into ``n - n_test`` train and ``n_test`` held-out indices.

    ``perm = randperm(n, generator=Generator().manual_seed(seed))``; test = ``perm[:n_test]``,
    train = the rest; both sorted. The same ``(n, n_test, seed)`` gives the same split on every
    machine (torch's CPU generator). For a validation set, split ``train`` again.

    Example:
        >>> train, test = split_indices(3787, n_test=500, seed=0)
        >>> len(train), len(test), bool(set(train.tolist()).isdisjoint(test.tolist()))
        (3287, 500, True)
    """
    if n < 0 or not 0 <= n_test <= n:
        raise ValueError(f"need 0 <= n_test <= n, got n={n}, n_test={n_test}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return Split(perm[n_test:].sort().values, perm[:n_test].sort().values)
