r"""The orbit interface: candidates ``g_k ∘ x0`` in factored form, with proposal densities.

A group element acting on node positions is written ``(g ∘ x)_i = A · x_{π(i)} + m``: a node
permutation ``π``, a 3×3 linear map ``A`` (rotation, reflection, basis relabelling) and a shift
``m`` (torus translation). An orbit returns its candidates as up to three *factors* — permutations
``[Kp, N]``, linear maps ``[B, Kl, 3, 3]`` and shifts ``[B, Ks, 3]`` — and the candidate set is their
product, ``K = Kp · Kl · Ks`` per graph, flattened in that order. Candidate 0 is always the
identity (every factor puts its identity first). Keeping the factors apart is what lets the
estimator score ``Kl`` rotations for each permutation with one 3×3 product each instead of
materializing ``Kl · N`` positions.

Each factor carries ``log_nu`` (``[B, K_factor]``): the log density of the proposal that drew it
with respect to the group's uniform (Haar / counting) measure, up to a per-graph constant, and a
``mask`` marking real candidates (graphs can have fewer candidates than the padded width).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class OrbitContext:
    """Everything an orbit may look at to build candidates for one batch.

    Attributes:
        x0: clean positions ``[N, 3]`` (already centred where the orbit needs it).
        xt: noisy positions ``[N, 3]`` (``None`` for :meth:`Orbit.random_element`).
        batch: node-to-graph map ``[N]``.
        num_graphs: ``B``.
        alpha, sigma: per-graph kernel coefficients, float64 ``[B]``.
        kernel: the forward kernel (Gaussian or wrapped normal).
        data: the PyG ``Data``/``Batch`` for node attributes (species, automorphisms), or ``None``.
    """

    x0: Tensor
    xt: Optional[Tensor]
    batch: Tensor
    num_graphs: int
    alpha: Optional[Tensor] = None
    sigma: Optional[Tensor] = None
    kernel: Any = None
    data: Any = None
    ptr: Optional[Tensor] = field(default=None)

    def __post_init__(self):
        if self.ptr is None:
            counts = torch.bincount(self.batch, minlength=self.num_graphs)
            self.ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def node_attr(self, key: str) -> Tensor:
        """A node attribute of ``data``, with an error naming the key when it is missing."""
        value = None if self.data is None else getattr(self.data, key, None)
        if value is None:
            raise KeyError(f"this orbit needs node attribute `{key}` on the batch, but it is missing")
        if value.size(0) != self.x0.size(0):
            raise ValueError(
                f"`{key}` has {value.size(0)} rows but the batch has {self.x0.size(0)} nodes"
            )
        return value


@dataclass
class OrbitCandidates:
    """Factored candidate set (see module docstring). Unused factors are ``None``.

    Besides ``*_log_nu`` (proposal) and ``*_mask``, a factor may carry ``*_log_lik``
    (``[B, K_factor]``): extra log-likelihood terms that depend on that factor alone and enter the
    weight as ``+ log_lik`` — e.g. the lattice kernel ``log q(L_t | P L0)`` of a lattice-permutation
    candidate, so that one joint softmax covers coordinates and lattice.

    **Exact (marginalized) factors.** Two continuous factors can be integrated out in closed form
    instead of sampled (the ``"exact"`` proposals):

    * ``exact_linear``: every linear candidate ``A_l`` (orthogonal) stands for the whole coset
      ``SO(3) · A_l``, integrated over Haar measure by the estimator (matrix Fisher posterior, see
      :mod:`orbit_pyg.orbits.matrix_fisher`); ``SO(3)`` has the one coset ``{I}``, ``O(3)`` the two
      ``{I, −I}``. Composing with other orthogonal linear factors keeps this form
      (``B R A = (B R Bᵀ) B A`` and ``B R Bᵀ`` is Haar again).
    * ``exact_shift``: the shift candidates stand for the whole torus ``[0, 1)^3`` of translations,
      integrated per axis by the estimator with ``exact_shift`` quadrature nodes
      (:mod:`orbit_pyg.orbits.torus_quadrature`); ``0`` means sampled shifts.

    The weights (and ESS) then range over the remaining discrete candidates (permutations,
    cosets, lattice relabellings): one candidate per graph gives ``ESS = 1`` with an exact target.
    """

    num_graphs: int
    perm: Optional[Tensor] = None  # [Kp, N] long: source node of each node
    perm_log_nu: Optional[Tensor] = None  # [B, Kp] float64
    perm_mask: Optional[Tensor] = None  # [B, Kp] bool
    perm_log_lik: Optional[Tensor] = None  # [B, Kp] float64
    linear: Optional[Tensor] = None  # [B, Kl, 3, 3] float64
    linear_log_nu: Optional[Tensor] = None
    linear_mask: Optional[Tensor] = None
    linear_log_lik: Optional[Tensor] = None
    shift: Optional[Tensor] = None  # [B, Ks, 3] float64
    shift_log_nu: Optional[Tensor] = None
    shift_mask: Optional[Tensor] = None
    shift_log_lik: Optional[Tensor] = None
    exact_linear: bool = False
    exact_shift: int = 0

    # --- sizes -------------------------------------------------------------------------------
    def factor_size(self, kind: str) -> int:
        """Number of candidates of factor ``kind`` (``"perm"``, ``"linear"``, ``"shift"``); 1 if absent."""
        value = getattr(self, kind)
        if value is None:
            return 1
        return value.size(0) if kind == "perm" else value.size(1)

    @property
    def sizes(self) -> tuple[int, int, int]:
        return tuple(self.factor_size(k) for k in _KINDS)

    @property
    def num_candidates(self) -> int:
        kp, kl, ks = self.sizes
        return kp * kl * ks

    def factor_offset(self, kind: str) -> Optional[Tensor]:
        """``log nu - log_lik`` of factor ``kind`` (``[B, k]`` float64), subtracted from the logits; ``None`` if zero."""
        log_nu, log_lik = getattr(self, kind + "_log_nu"), getattr(self, kind + "_log_lik")
        if log_lik is None:
            return log_nu
        return -log_lik if log_nu is None else log_nu - log_lik

    def _filled(self, kind: str, suffix: str, device) -> Tensor:
        value = getattr(self, kind + suffix)
        if value is not None:
            return value
        shape = (self.num_graphs, self.factor_size(kind))
        if suffix == "_mask":
            return torch.ones(shape, dtype=torch.bool, device=device)
        return torch.zeros(shape, dtype=torch.float64, device=device)

    def joint_log_nu_and_mask(self, device) -> tuple[Tensor, Tensor]:
        """Offset (``log nu - log_lik``) and mask of every joint candidate, ``[B, Kp, Kl, Ks]``."""
        b = self.num_graphs
        offset = torch.zeros((b, 1, 1, 1), dtype=torch.float64, device=device)
        mask = torch.ones((b, 1, 1, 1), dtype=torch.bool, device=device)
        for axis, kind in enumerate(_KINDS):
            shape = [b, 1, 1, 1]
            shape[axis + 1] = self.factor_size(kind)
            off = self.factor_offset(kind)
            if off is not None:
                offset = offset + off.view(shape)
            mask = mask & self._filled(kind, "_mask", device).view(shape)
        return offset.expand(b, *self.sizes), mask.expand(b, *self.sizes)

    def marginal_weights(self, weights: Tensor, kind: str) -> Tensor:
        """Sum joint weights ``[B, K]`` over the other factors: ``[B, K_kind]``."""
        b = self.num_graphs
        axis = _KINDS.index(kind) + 1
        joint = weights.view(b, *self.sizes)
        return joint.sum(dim=[d for d in (1, 2, 3) if d != axis])

    # --- positions ---------------------------------------------------------------------------
    def permuted(self, x0: Tensor) -> Tensor:
        """``x0`` under every permutation candidate, ``[Kp, N, 3]``."""
        return x0.unsqueeze(0) if self.perm is None else x0[self.perm]

    def materialize(self, x0: Tensor, batch: Tensor, flat: Tensor) -> Tensor:
        """Positions of the joint candidates with flat indices ``flat`` (``[C]``): ``[C, N, 3]``.

        Computed in float64 and returned in ``x0``'s dtype.
        """
        kp, kl, ks = self.sizes
        p, rest = flat // (kl * ks), flat % (kl * ks)
        l, s = rest // ks, rest % ks
        y = (x0 if self.perm is None else x0[self.perm[p]]).to(torch.float64)
        if y.dim() == 2:
            y = y.unsqueeze(0).expand(flat.numel(), -1, -1)
        if self.linear is not None:
            a = self.linear[batch.unsqueeze(0), l.unsqueeze(1)]  # [C, N, 3, 3]
            y = torch.einsum("cnij,cnj->cni", a, y)
        if self.shift is not None:
            y = y + self.shift[batch.unsqueeze(0), s.unsqueeze(1)]
        return y.to(x0.dtype)

    # --- composition -------------------------------------------------------------------------
    def combine(self, other: "OrbitCandidates") -> "OrbitCandidates":
        """Product of two candidate sets: every pair ``g ∘ h``, factor by factor."""
        out = replace(self)
        out.exact_linear = self.exact_linear or other.exact_linear
        out.exact_shift = max(self.exact_shift, other.exact_shift)
        for kind in _KINDS:
            mine, theirs = getattr(self, kind), getattr(other, kind)
            if theirs is None:
                continue
            if mine is None:
                for suffix in _SUFFIXES:
                    setattr(out, kind + suffix, getattr(other, kind + suffix))
                continue
            setattr(out, kind, _compose(kind, mine, theirs))
            b, k1, k2 = self.num_graphs, self.factor_size(kind), other.factor_size(kind)
            for suffix in _SUFFIXES[1:]:
                a, c = getattr(self, kind + suffix), getattr(other, kind + suffix)
                if a is None and c is None:
                    continue
                a = self._filled(kind, suffix, mine.device)
                c = other._filled(kind, suffix, mine.device)
                joint = (a.unsqueeze(2) & c.unsqueeze(1)) if suffix == "_mask" else (a.unsqueeze(2) + c.unsqueeze(1))
                setattr(out, kind + suffix, joint.reshape(b, k1 * k2))
        return out


_KINDS = ("perm", "linear", "shift")
_SUFFIXES = ("", "_log_nu", "_mask", "_log_lik")


def _compose(kind: str, a: Tensor, b: Tensor) -> Tensor:
    if kind == "perm":  # (a ∘ b ∘ x)_i = x_{b[a[i]]}
        return b[:, a].permute(1, 0, 2).reshape(-1, a.size(1))
    if kind == "linear":
        return (a.unsqueeze(2) @ b.unsqueeze(1)).flatten(1, 2)
    return (a.unsqueeze(2) + b.unsqueeze(1)).flatten(1, 2)


class Orbit:
    """Base class of group orbits.

    Subclasses implement :meth:`candidates` (the estimator's candidate set, identity first, of
    about ``num_candidates`` elements per graph) and :meth:`random_element` (one element per graph
    drawn from the group's uniform measure: the data-augmentation baseline). Orbits compose with
    ``*`` into a :class:`ProductOrbit` whose candidates are all combinations (one joint softmax).
    """

    #: whether the orbit needs positions centred per graph (rotations do).
    needs_centering: bool = False

    def candidates(self, ctx: OrbitContext, generator: Optional[torch.Generator] = None) -> OrbitCandidates:
        raise NotImplementedError

    def random_element(self, ctx: OrbitContext, generator: Optional[torch.Generator] = None) -> OrbitCandidates:
        raise NotImplementedError

    def __mul__(self, other: "Orbit") -> "ProductOrbit":
        left = self.orbits if isinstance(self, ProductOrbit) else [self]
        right = other.orbits if isinstance(other, ProductOrbit) else [other]
        return ProductOrbit(left + right)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{self.__class__.__name__}({args})"

    def _repr_args(self) -> dict:
        return {}


class ProductOrbit(Orbit):
    """Product of orbits acting on different factors (e.g. species permutations × SO(3)).

    The candidate set is the Cartesian product of the members' candidates; the estimator forms
    one joint softmax per graph over all combinations, and ``log nu`` adds up.

    Example:
        >>> from orbit_pyg.orbits import SO3, SpeciesPermutation
        >>> orbit = SpeciesPermutation(max_candidates=50) * SO3(num_candidates=200)
        >>> orbit
        ProductOrbit(SpeciesPermutation(key='z', max_candidates=50, proposal='uniform'), SO3(num_candidates=200, proposal='uniform'))
    """

    def __init__(self, orbits: list[Orbit]):
        if not orbits:
            raise ValueError("ProductOrbit needs at least one orbit")
        self.orbits = list(orbits)
        self.needs_centering = any(o.needs_centering for o in self.orbits)

    def candidates(self, ctx, generator=None):
        out = self.orbits[0].candidates(ctx, generator)
        for orbit in self.orbits[1:]:
            out = out.combine(orbit.candidates(ctx, generator))
        return out

    def random_element(self, ctx, generator=None):
        out = self.orbits[0].random_element(ctx, generator)
        for orbit in self.orbits[1:]:
            out = out.combine(orbit.random_element(ctx, generator))
        return out

    def __repr__(self) -> str:
        return f"ProductOrbit({', '.join(repr(o) for o in self.orbits)})"


def apply_element(cands: OrbitCandidates, x0: Tensor, batch: Tensor) -> Tensor:
    """Positions under the first joint candidate of ``cands`` (used with :meth:`Orbit.random_element`)."""
    return cands.materialize(x0, batch, torch.zeros(1, dtype=torch.long, device=x0.device))[0]
