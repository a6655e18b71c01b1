r"""Conditioning for crystal generation: condition vectors, property normalizers, classifier-free guidance.

A condition is one vector ``c_b`` per crystal, stored on each ``Data`` as ``cond [1, d]`` (so a PyG
batch carries ``cond [B, d]``): a text embedding (:mod:`.text`), normalized scalar properties
(:class:`PropertyNormalizer`), or both concatenated (text first). :class:`~.model.CSPNet` built
with ``cond_dim = d`` reads it through FiLM in every layer.

Classifier-free guidance (Ho & Salimans 2022):

* training (:class:`ConditionalLoss`): each crystal's condition is replaced by the network's learned
  null condition with probability ``p`` (``cond_drop_prob``); a row of ``cond`` that is not finite
  (a missing description or property, stored as NaN) is always dropped;
* sampling (:func:`guided_model`): with guidance scale ``s`` (the diffusers / Ho & Salimans
  convention), every network output ``o`` (the lattice noise and the normalized coordinate score) is
  ``o = o(x, null) + s · (o(x, c) - o(x, null))``. ``s = 1`` (the default) is the plain conditional
  prediction (one network call), ``s = 0`` the unconditioned prediction (one call on the null
  condition), ``s > 1`` pushes samples further towards the condition. Sampling "without condition"
  (``cond=None``) runs the same network on the null condition.

Example:
    >>> import torch
    >>> norm = PropertyNormalizer(["heat_all"]).fit(torch.tensor([[0.0], [2.0], [4.0]]))
    >>> norm.encode({"heat_all": 4.0})
    tensor([[1.]])
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "CONDITIONS", "PROPERTY_COLUMNS", "PropertyNormalizer", "ConditionalLoss", "guided_model",
    "attach_conditions", "stack_conditions", "parse_properties", "condition_vectors", "property_values",
    "sample_condition",
]

CONDITIONS = ("none", "text", "props", "text+props")
#: Perov-5 properties conditioned on by default (heat of formation, direct band gap).
PROPERTY_COLUMNS = ("heat_all", "dir_gap")


class PropertyNormalizer:
    r"""Standardize scalar properties with training statistics: ``u_k = (y_k - mean_k) / std_k``.

    ``fit`` ignores NaN entries (missing values); ``to_dict`` / ``from_dict`` store the statistics
    in a run folder so a user asks for ``heat_all=...`` in physical units at sampling time.

    Example:
        >>> n = PropertyNormalizer(["a", "b"], mean=[1.0, 0.0], std=[2.0, 1.0])
        >>> n.encode({"a": 3.0, "b": -1.0}), n.decode(torch.tensor([[1.0, -1.0]]))
        (tensor([[ 1., -1.]]), tensor([[ 3., -1.]]))
    """

    def __init__(self, names: Sequence[str], mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        self.names = [str(n) for n in names]
        if not self.names:
            raise ValueError("`names` must list at least one property")
        self.mean = None if mean is None else torch.tensor([float(m) for m in mean])
        self.std = None if std is None else torch.tensor([float(s) for s in std])
        if self.std is not None and bool((self.std <= 0).any()):
            raise ValueError(f"`std` must be positive, got {self.std.tolist()}")

    def fit(self, values: Tensor) -> "PropertyNormalizer":
        """Mean and standard deviation of ``values [n, k]`` per column (NaN ignored)."""
        values = torch.as_tensor(values, dtype=torch.float64)
        if values.dim() != 2 or values.size(1) != len(self.names):
            raise ValueError(f"`values` must have shape [n, {len(self.names)}] ({self.names}), got {list(values.shape)}")
        ok = torch.isfinite(values)
        counts = ok.sum(0)
        if bool((counts < 2).any()):
            raise ValueError(f"every property needs >= 2 finite values to fit; counts {dict(zip(self.names, counts.tolist()))}")
        v = torch.where(ok, values, torch.zeros_like(values))
        mean = v.sum(0) / counts
        var = torch.where(ok, (values - mean) ** 2, torch.zeros_like(values)).sum(0) / (counts - 1)
        self.mean, self.std = mean.float(), var.sqrt().clamp_min(1e-8).float()
        return self

    def _ready(self) -> None:
        if self.mean is None or self.std is None:
            raise RuntimeError("PropertyNormalizer is not fitted: call fit(values) or pass mean/std")

    def encode(self, values: Tensor | Mapping[str, float]) -> Tensor:
        """``[n, k]`` (or a ``{name: value}`` mapping, giving ``[1, k]``) in physical units → standardized."""
        self._ready()
        if isinstance(values, Mapping):
            missing = [n for n in self.names if n not in values]
            extra = sorted(set(values) - set(self.names))
            if missing or extra:
                raise ValueError(f"properties must be exactly {self.names}; missing {missing}, unknown {extra}")
            values = torch.tensor([[float(values[n]) for n in self.names]])
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.dim() != 2 or values.size(1) != len(self.names):
            raise ValueError(f"`values` must have shape [n, {len(self.names)}] ({self.names}), got {list(values.shape)}")
        return (values - self.mean) / self.std

    def decode(self, values: Tensor) -> Tensor:
        """Inverse of :meth:`encode`."""
        self._ready()
        return torch.as_tensor(values, dtype=torch.float32) * self.std + self.mean

    def to_dict(self) -> dict:
        """``{"names", "mean", "std"}`` (JSON-ready; the run's ``cond_stats``)."""
        self._ready()
        return {"names": self.names, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PropertyNormalizer":
        """Inverse of :meth:`to_dict`."""
        return cls(d["names"], d["mean"], d["std"])

    def __repr__(self) -> str:
        return f"PropertyNormalizer(names={self.names})"


def parse_properties(text: str | Sequence[str]) -> dict[str, float]:
    """``"heat_all=-0.5,dir_gap=2"`` (or a list of ``name=value``) → ``{"heat_all": -0.5, "dir_gap": 2.0}``.

    Example:
        >>> parse_properties(["heat_all=-0.5", "dir_gap=2"])
        {'heat_all': -0.5, 'dir_gap': 2.0}
    """
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    out = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"property {item!r} must be written name=value (e.g. heat_all=-0.5)")
        try:
            out[name.strip()] = float(value)
        except ValueError as err:
            raise ValueError(f"property {name.strip()!r}: {value!r} is not a number") from err
    if not out:
        raise ValueError("no property given: write name=value, e.g. heat_all=-0.5")
    return out


def property_values(data_list: Sequence, names: Sequence[str]) -> Tensor:
    """``[n, k]`` property values read from each ``Data``'s per-property field (``[1]`` tensors; NaN stays NaN).

    A crystal without the field raises ``ValueError`` naming it.

    Example:
        >>> from torch_geometric.data import Data
        >>> property_values([Data(heat_all=torch.tensor([-0.5])), Data(heat_all=torch.tensor([1.0]))], ["heat_all"])
        tensor([[-0.5000],
                [ 1.0000]])
    """
    rows = []
    for i, d in enumerate(data_list):
        row = []
        for name in names:
            v = getattr(d, name, None)
            if v is None:
                raise ValueError(f"crystal {i} has no property field {name!r} (a [1] tensor per property, as "
                                 "CDVAEDataset stores its CSV columns)")
            row.append(float(torch.as_tensor(v).reshape(-1)[0]))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32).reshape(len(data_list), len(names))


def attach_conditions(data_list: Sequence, cond: Tensor) -> list:
    """Shallow copies of ``data_list`` carrying ``cond [1, d]`` each (row ``i`` of ``cond [n, d]``; NaN rows = missing).

    Example:
        >>> from torch_geometric.data import Batch, Data
        >>> data = attach_conditions([Data(num_nodes=2), Data(num_nodes=1)], torch.tensor([[1.0], [2.0]]))
        >>> Batch.from_data_list(data).cond, stack_conditions(data).shape  # a batch carries cond [B, d]
        (tensor([[1.],
                [2.]]), torch.Size([2, 1]))
    """
    cond = torch.as_tensor(cond, dtype=torch.float32)
    if cond.dim() != 2 or cond.size(0) != len(data_list):
        raise ValueError(f"`cond` must have shape [{len(data_list)}, d], got {list(cond.shape)}")
    out = []
    for d, c in zip(data_list, cond):
        d = d.clone()
        d.cond = c.unsqueeze(0)
        out.append(d)
    return out


def stack_conditions(data_list: Sequence) -> Tensor:
    """``[n, d]`` from the ``cond [1, d]`` fields of ``data_list`` (error naming the first one without)."""
    for i, d in enumerate(data_list):
        if getattr(d, "cond", None) is None:
            raise ValueError(f"data_list[{i}] has no `cond` field: attach conditions first (attach_conditions)")
    return torch.cat([d.cond for d in data_list], dim=0)


class ConditionalLoss(nn.Module):
    r"""Wrap a crystal loss for classifier-free-guidance training.

    ``forward(model, data, generator)`` reads ``data.cond [B, d]``, draws ``drop_b ~ Bernoulli(p)``
    from ``generator`` (before the wrapped loss draws its noise), also drops non-finite rows
    (missing conditions), and runs ``loss(model', data, generator)`` with
    ``model'(...) = model(..., cond=cond, cond_drop=drop)``. Reported metric: ``cond_dropped``
    (fraction of dropped rows).

    Example:
        >>> inner = lambda model, data, generator: (model(), {})
        >>> seen = lambda cond=None, cond_drop=None: cond_drop
        >>> data = type("Batch", (), {"cond": torch.tensor([[1.0], [float("nan")]])})()
        >>> ConditionalLoss(inner, drop_prob=0.0)(seen, data)  # the missing row is dropped
        (tensor([False,  True]), {'cond_dropped': 0.5})
    """

    def __init__(self, loss: nn.Module, drop_prob: float = 0.1):
        super().__init__()
        if not 0.0 <= float(drop_prob) <= 1.0:
            raise ValueError(f"`drop_prob` must lie in [0, 1], got {drop_prob}")
        self.loss, self.drop_prob = loss, float(drop_prob)

    def forward(self, model: Callable, data, generator: Optional[torch.Generator] = None):
        cond = getattr(data, "cond", None)
        if cond is None:
            raise ValueError("a conditional run needs batches with `cond` [B, d] (attach_conditions to the training data)")
        b = cond.size(0)
        u = torch.rand(b, generator=generator, device=cond.device if generator is None else generator.device)
        missing = ~torch.isfinite(cond).all(dim=-1)
        drop = (u.to(cond.device) < self.drop_prob) | missing
        cond = torch.where(missing.unsqueeze(-1), torch.zeros_like(cond), cond)

        def conditioned(*args, **kwargs):
            return model(*args, cond=cond, cond_drop=drop, **kwargs)

        out = self.loss(conditioned, data, generator)
        if isinstance(out, tuple):
            return out[0], {**dict(out[1]), "cond_dropped": float(drop.float().mean())}
        return out

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def guided_model(model: Callable, cond: Optional[Tensor], guidance: float = 1.0) -> Callable:
    r"""The guided denoiser ``(z, frac, cell, t, batch, num_graphs) -> (lattice_out, coord_out)``.

    ``o = o(null) + s · (o(cond) - o(null))`` for both outputs, with ``s = guidance``: ``s = 1`` is
    exactly ``model(..., cond=cond)`` (one call), ``s = 0`` exactly ``model(...)`` on the null
    condition (one call), any other ``s`` two calls. ``cond=None``: the null condition, ``model`` itself.

    Example:
        >>> net = lambda z, f, l, t, b, n, cond=None: (l * (0 if cond is None else cond.sum()), f)
        >>> f, l = torch.ones(1, 3), torch.ones(1, 3, 3)
        >>> [float(guided_model(net, torch.tensor([[2.0]]), s)(None, f, l, 0.5, None, 1)[0][0, 0, 0]) for s in (0, 1, 3)]
        [0.0, 2.0, 6.0]
    """
    s = float(guidance)
    if not math.isfinite(s):
        raise ValueError(f"`guidance` must be finite, got {guidance}")
    if cond is None:
        return model

    def guided(z, frac, cell, t, batch=None, num_graphs=None):
        if s == 0.0:
            return model(z, frac, cell, t, batch, num_graphs)
        lat_c, coord_c = model(z, frac, cell, t, batch, num_graphs, cond=cond)
        if s == 1.0:
            return lat_c, coord_c
        lat_u, coord_u = model(z, frac, cell, t, batch, num_graphs)
        return lat_u + s * (lat_c - lat_u), coord_u + s * (coord_c - coord_u)

    return guided


def condition_vectors(kind: str, n: int, *, text: Optional[Tensor] = None, props: Optional[Tensor] = None,
                      normalizer: Optional[PropertyNormalizer] = None) -> Tensor:
    r"""The ``[n, d]`` condition of ``kind`` in ``CONDITIONS``: ``text`` embeddings, normalized ``props``, or both (text first).

    ``props`` are in physical units (``[n, k]``, normalized here with ``normalizer``); missing
    entries (NaN) stay NaN, i.e. that crystal's condition is missing (the null condition in training).

    Example:
        >>> condition_vectors("text+props", 1, text=torch.ones(1, 2), props=torch.tensor([[3.0]]),
        ...                   normalizer=PropertyNormalizer(["a"], [1.0], [2.0]))
        tensor([[1., 1., 1.]])
    """
    if kind not in CONDITIONS or kind == "none":
        raise ValueError(f"`kind` must be one of {CONDITIONS[1:]}, got {kind!r}")
    parts = []
    if "text" in kind:
        if text is None:
            raise ValueError(f"condition {kind!r} needs `text` embeddings [n, d]")
        parts.append(torch.as_tensor(text, dtype=torch.float32))
    if "props" in kind:
        if props is None or normalizer is None:
            raise ValueError(f"condition {kind!r} needs `props` [n, k] and a fitted `normalizer`")
        parts.append(normalizer.encode(props))
    for p in parts:
        if p.dim() != 2 or p.size(0) != n:
            raise ValueError(f"every condition part must have shape [{n}, d], got {list(p.shape)}")
    return torch.cat(parts, dim=1)


def sample_condition(
    cfg,
    n: int,
    *,
    text: Optional[str] = None,
    props: Optional[str | Sequence[str] | Mapping[str, float]] = None,
    references: Optional[Sequence] = None,
    encoder: Optional[Callable[[list[str]], Tensor]] = None,
    cache_dir: Optional[str] = None,
    progress: bool = False,
) -> tuple[Optional[Tensor], Optional[dict]]:
    r"""The ``[n, d]`` sampling condition of a run (``cfg``: its ``CSPConfig``) and a description of what was asked.

    ``text``: one description for all ``n`` samples (embedded with ``encoder``, default
    :class:`~.text.MiniLMEncoder`); ``props``: target properties in physical units, one for all
    (``"heat_all=-0.5,dir_gap=2"``, a list of ``name=value`` or a mapping; normalized with the run's
    ``cfg.cond_stats``). A part of the run's condition that is not given is read from each of
    ``references`` (their own ``cfg.cond_text`` description, cached under ``cache_dir``, or their
    property fields) when they are passed. With nothing given and no references the result is
    ``(None, None)``: the null condition, i.e. unconditioned sampling of a conditional run.

    Raises:
        ValueError: ``text`` / ``props`` given to a run trained without that condition (naming it);
            unknown or missing property names; a ``text+props`` run given only one part and no
            references (the network's null condition replaces the whole vector, never half of it).

    Example:
        >>> from orbit_pyg.integrations.crystal.csp import CSPConfig
        >>> cfg = CSPConfig(condition="props", cond_props=["a"], cond_stats={"names": ["a"], "mean": [1.0], "std": [2.0]})
        >>> sample_condition(cfg, 2, props="a=5")
        (tensor([[2.],
                [2.]]), {'props': {'a': 5.0}})
        >>> sample_condition(cfg, 2)
        (None, None)
    """
    kind = cfg.condition
    if kind == "none":
        if text is not None or props:
            raise ValueError("the model was trained without a condition (condition='none'): it takes no text or "
                             "properties; retrain with condition text|props")
        return None, None
    if text is not None and "text" not in kind:
        raise ValueError(f"the model is conditioned on {kind}, not text: drop the text")
    if props and "props" not in kind:
        raise ValueError(f"the model is conditioned on {kind}, not properties: drop the properties")
    if text is None and not props and references is None:
        return None, None
    parts = [p for p in ("text", "props") if p in kind]
    given = {"text": text is not None, "props": bool(props)}
    if references is None and not all(given[p] for p in parts):
        missing = [p for p in parts if not given[p]]
        raise ValueError(f"the model is conditioned on {kind}: give {' and '.join(missing)} as well (or neither, "
                         "for the null condition)")
    text_emb = prop_values = normalizer = None
    asked: dict = {}
    if "text" in kind:
        from .text import MiniLMEncoder, dataset_text_embeddings, embed_texts

        if text is not None:
            text_emb, asked["text"] = embed_texts([text], encoder or MiniLMEncoder()).expand(n, -1), text
        else:
            text_emb, _ = dataset_text_embeddings(references, cfg.cond_text, cache_dir=cache_dir, encoder=encoder,
                                                  progress=progress)
            asked["text"] = f"each reference's {cfg.cond_text} description"
    if "props" in kind:
        if not cfg.cond_stats:
            raise ValueError("the run stores no property statistics (cond_stats): it cannot normalize target properties")
        normalizer = PropertyNormalizer.from_dict(cfg.cond_stats)
        if props:
            values = dict(props) if isinstance(props, Mapping) else parse_properties(props)
            normalizer.encode(values)  # validates the names
            prop_values = torch.tensor([[float(values[k]) for k in normalizer.names]]).expand(n, -1)
            asked["props"] = {k: float(values[k]) for k in normalizer.names}
        else:
            prop_values, asked["props"] = property_values(references, normalizer.names), "each reference's own values"
    return condition_vectors(kind, n, text=text_emb, props=prop_values, normalizer=normalizer), asked
