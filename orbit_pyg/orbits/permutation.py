r"""Finite orbits: species permutations, explicit permutation lists (graph automorphisms), and
finite linear groups given by their elements.

A permutation acts on node positions by ``(π ∘ x)_i = x_{π(i)}``.

**Species permutations.** Nodes of equal species within a graph can be relabelled freely: the
group is ``prod_c S_{n_c}`` over the species classes ``c`` of the graph, of order ``prod_c n_c!``.
When that order is at most ``max_candidates`` the group is *enumerated exactly* (mixed-radix
Lehmer decoding, vectorized over graphs and candidates; the estimator is then the exact posterior
mean). Otherwise ``max_candidates`` elements are drawn:

* ``"uniform"``: uniform random permutations within each class (random keys, sorted), ``log nu = 0``;
* ``"guided"``: a defensive mixture of uniform (share ``lambda``) and a *sequential* proposal that
  assigns the class members in order, the ``r``-th taking source ``j`` among the remaining ones
  with probability ``softmax_j(l_rj)``, ``l_rj = sum_d log q_t(x_t,r,d | x0_j,d)`` (the kernel's own
  per-pair log-likelihood). At low noise it follows the optimal assignment; its exact density is
  the product of the sequential softmax factors, so the weight uses
  ``nu(π) = lambda + (1 - lambda) |G| q_seq(π)`` relative to the uniform measure.

Candidate 0 is always the identity.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Orbit, OrbitCandidates, OrbitContext


def species_classes(z: Tensor, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group nodes into (graph, species) classes.

    Returns ``members [C, m]`` (global node indices, ``-1`` padded, in node order),
    ``sizes [C]`` and ``class_graph [C]`` (graph of each class).
    """
    z = z.reshape(-1).long()
    key = batch * (int(z.max()) + 1 - min(int(z.min()), 0)) + (z - min(int(z.min()), 0))
    uniq, cls = torch.unique(key, return_inverse=True)
    order = torch.argsort(cls * z.numel() + torch.arange(z.numel(), device=z.device))
    sizes = torch.bincount(cls, minlength=uniq.numel())
    starts = torch.cumsum(sizes, 0) - sizes
    sorted_cls = cls[order]
    rank = torch.arange(z.numel(), device=z.device) - starts[sorted_cls]
    m = int(sizes.max())
    members = torch.full((uniq.numel(), m), -1, dtype=torch.long, device=z.device)
    members[sorted_cls, rank] = order
    class_graph = batch[members[:, 0]]
    return members, sizes, class_graph


def _lehmer_decode(index: Tensor, sizes: Tensor, m: int) -> Tensor:
    """Permutations of ``range(n)`` from their rank in lexicographic order.

    ``index [K, C]`` ranks, ``sizes [C]``; returns ``[K, C, m]`` (positions ``>= n`` keep their index).
    """
    k, c = index.shape
    fact = torch.tensor([math.factorial(i) for i in range(m + 1)], dtype=torch.long, device=index.device)
    available = torch.arange(m, device=index.device).expand(k, c, m) < sizes.view(1, c, 1)
    out = torch.arange(m, device=index.device).expand(k, c, m).clone()
    rem = index.clone()
    for r in range(m):
        active = sizes > r  # [C]
        remaining = (sizes - 1 - r).clamp(min=0)
        digit = torch.div(rem, fact[remaining].view(1, c), rounding_mode="floor")
        rem = rem - digit * fact[remaining].view(1, c)
        # choose the digit-th still-available position
        csum = torch.cumsum(available.long(), -1)
        pick = ((csum == (digit + 1).unsqueeze(-1)) & available).float().argmax(-1)  # [K, C]
        out[:, :, r] = torch.where(active.view(1, c), pick, out[:, :, r])
        taken = torch.nn.functional.one_hot(pick, m).bool() & active.view(1, c, 1)
        available = available & ~taken
    return out


def _perm_from_class_ranks(sigma: Tensor, members: Tensor, num_nodes: int) -> Tensor:
    """Node permutations ``[K, N]`` from per-class rank permutations ``sigma [K, C, m]``."""
    k = sigma.size(0)
    valid = members >= 0
    perm = torch.arange(num_nodes, device=members.device).repeat(k, 1)
    src = torch.gather(members.expand(k, -1, -1), 2, sigma.clamp(max=members.size(1) - 1))
    dst = members.expand(k, -1, -1)
    rows = torch.arange(k, device=members.device).view(k, 1, 1).expand_as(dst)
    perm[rows[:, valid], dst[:, valid]] = src[:, valid]
    return perm


class SpeciesPermutation(Orbit):
    """Relabellings of atoms of equal species within each graph.

    Args:
        key: node attribute holding the species (atomic numbers), default ``"z"``.
        max_candidates: ``K``; groups of order ``<= K`` are enumerated exactly, larger ones sampled.
        proposal: ``"uniform"`` or ``"guided"`` (sampled groups only).
        uniform_fraction: share of uniform draws in the guided mixture.

    Example:
        >>> import torch
        >>> from orbit_pyg.orbits import SpeciesPermutation, OrbitContext
        >>> from torch_geometric.data import Data
        >>> d = Data(z=torch.tensor([8, 1, 1]), pos=torch.randn(3, 3))
        >>> ctx = OrbitContext(x0=d.pos, xt=d.pos, batch=torch.zeros(3, dtype=torch.long), num_graphs=1, data=d)
        >>> SpeciesPermutation(max_candidates=10).candidates(ctx).perm.tolist()  # H2O: 2! = 2 elements
        [[0, 1, 2], [0, 2, 1]]
    """

    def __init__(
        self, key: str = "z", max_candidates: int = 50, proposal: str = "uniform", uniform_fraction: float = 0.25
    ):
        if not isinstance(key, str):
            raise TypeError(f"`key` must be the name of the species attribute (a string), got {key!r}")
        if int(max_candidates) < 1:
            raise ValueError(f"`max_candidates` must be >= 1, got {max_candidates}")
        if proposal not in ("uniform", "guided"):
            raise ValueError(f"unknown proposal {proposal!r}: use 'uniform' or 'guided'")
        if not 0 < uniform_fraction <= 1:
            raise ValueError(f"`uniform_fraction` must lie in (0, 1], got {uniform_fraction}")
        self.key, self.max_candidates, self.proposal = key, int(max_candidates), proposal
        self.uniform_fraction = float(uniform_fraction)

    def _repr_args(self) -> dict:
        return {"key": self.key, "max_candidates": self.max_candidates, "proposal": self.proposal}

    def _classes(self, ctx: OrbitContext):
        z = ctx.node_attr(self.key)
        if z.dim() > 1:
            raise ValueError(f"`{self.key}` must be a vector of species per node, got shape {list(z.shape)}")
        members, sizes, class_graph = species_classes(z, ctx.batch)
        log_order = torch.zeros(ctx.num_graphs, dtype=torch.float64, device=z.device)
        log_order.index_add_(0, class_graph, torch.lgamma(sizes.to(torch.float64) + 1))
        return members, sizes, class_graph, log_order

    def candidates(self, ctx: OrbitContext, generator=None) -> OrbitCandidates:
        members, sizes, class_graph, log_order = self._classes(ctx)
        b, n = ctx.num_graphs, ctx.x0.size(0)
        device = members.device
        m = members.size(1)
        enumerate_graph = log_order <= math.log(self.max_candidates) + 1e-9  # [B]
        enum_class = enumerate_graph[class_graph]
        order = torch.where(enumerate_graph, torch.exp(log_order).round(), torch.ones_like(log_order)).long()
        # padded width: the largest enumerated order, or K when some group is sampled
        k = self.max_candidates if not bool(enumerate_graph.all()) else int(order.max())

        # exact enumeration (mixed radix over the classes of each graph)
        class_order = torch.where(
            enum_class, torch.exp(torch.lgamma(sizes.to(torch.float64) + 1)).round().long(), torch.ones_like(sizes)
        )
        # stride of class c = product of the orders of earlier classes of the same graph
        log_co = torch.log(class_order.to(torch.float64))
        cum = torch.cumsum(log_co, 0) - log_co
        first_class = torch.full((b,), len(sizes), dtype=torch.long, device=device).scatter_reduce(
            0, class_graph, torch.arange(len(sizes), device=device), "amin"
        )
        stride = torch.exp(cum - cum[first_class[class_graph]]).round().long()
        idx = torch.arange(k, device=device).view(k, 1)
        # sampled groups draw uniform ranks; enumerated classes start at the identity and the
        # non-trivial ones (|c| >= 2, at most log K of them per graph) are decoded, narrowly
        sigma = self._uniform_ranks(k, sizes, m, generator, device)
        sigma[:, enum_class] = torch.arange(m, device=device)
        decode = enum_class & (sizes > 1)
        if bool(decode.any()):
            m_dec = int(sizes[decode].max())
            rank = torch.div(idx, stride[decode].view(1, -1), rounding_mode="floor") % class_order[decode].view(1, -1)
            sigma[:, decode, :m_dec] = _lehmer_decode(rank, sizes[decode], m_dec)
        sigma[0] = torch.arange(m, device=device)  # identity first
        log_nu = torch.zeros(b, k, dtype=torch.float64, device=device)
        if self.proposal == "guided" and not bool(enumerate_graph.all()):
            sigma, log_nu = self._guided(ctx, members, sizes, class_graph, log_order, sigma, enum_class, generator)
        mask = torch.ones(b, k, dtype=torch.bool, device=device)
        mask = torch.where(enumerate_graph.view(b, 1), idx.view(1, k) < order.view(b, 1), mask)
        perm = _perm_from_class_ranks(sigma, members, n)
        return OrbitCandidates(b, perm=perm, perm_log_nu=log_nu, perm_mask=mask)

    @staticmethod
    def _uniform_ranks(k: int, sizes: Tensor, m: int, generator, device) -> Tensor:
        keys = torch.rand(k, sizes.numel(), m, generator=generator, device=device)
        pad = torch.arange(m, device=device).view(1, 1, m) >= sizes.view(1, -1, 1)
        keys = torch.where(pad, 2.0 + torch.arange(m, device=device).float().view(1, 1, m), keys)
        return torch.argsort(keys, dim=-1)

    def _pair_logits(self, ctx: OrbitContext, members: Tensor) -> Tensor:
        """``l[c, r, j] = sum_d log q(x_t[members[c, r]] | x0[members[c, j]])`` (float64)."""
        safe = members.clamp(min=0)
        xt = ctx.xt.to(torch.float64)[safe]  # [C, m, 3]
        x0 = ctx.x0.to(torch.float64)[safe]
        g = ctx.batch[safe[:, 0]]
        alpha = ctx.alpha[g].view(-1, 1, 1, 1)
        sigma = ctx.sigma[g].clamp(min=1e-12).view(-1, 1, 1, 1)
        return ctx.kernel.log_prob_terms(xt.unsqueeze(2), x0.unsqueeze(1), alpha, sigma).sum(-1)

    def _guided(self, ctx, members, sizes, class_graph, log_order, sigma_uni, enum_class, generator):
        """Mix uniform draws with sequential-softmax draws; returns ranks and ``log nu`` per graph.

        Only the classes that are sampled and have two or more members take part, each padded to
        the largest of them (singletons and enumerated classes keep their ranks).
        """
        if ctx.xt is None or ctx.kernel is None:
            raise ValueError("the guided permutation proposal needs xt and the kernel in the context")
        k, _, m = sigma_uni.shape
        device = members.device
        b = log_order.numel()
        act = ~enum_class & (sizes > 1)
        sizes_a = sizes[act]
        c, m_a = int(act.sum()), int(sizes_a.max())
        logits = self._pair_logits(ctx, members[act][:, :m_a])  # [Ca, m_a, m_a]
        valid = torch.arange(m_a, device=device).view(1, m_a) < sizes_a.view(c, 1)
        available = valid.unsqueeze(0).expand(k, c, m_a).clone()
        sigma_seq = torch.arange(m_a, device=device).expand(k, c, m_a).clone()
        gumbel = -torch.log(-torch.log(torch.rand(m_a, k, c, m_a, generator=generator, device=device).clamp(min=1e-30)))
        for r in range(m_a - 1):  # the last member has a single choice left
            active = (sizes_a > r + 1).view(1, c)
            score = torch.where(available, logits[:, r].unsqueeze(0) + gumbel[r], -math.inf)
            pick = score.argmax(-1)
            sigma_seq[:, :, r] = torch.where(active, pick, sigma_seq[:, :, r])
            available &= ~(torch.nn.functional.one_hot(pick, m_a).bool() & active.unsqueeze(-1))
        last = (available & valid.unsqueeze(0)).float().argmax(-1)  # the one member left
        sigma_seq.scatter_(2, (sizes_a - 1).view(1, c, 1).expand(k, c, 1), last.unsqueeze(-1))
        use_uniform = torch.rand(k, 1, 1, generator=generator, device=device) < self.uniform_fraction
        sigma = sigma_uni.clone()
        sigma[:, act, :m_a] = torch.where(use_uniform, sigma_uni[:, act, :m_a], sigma_seq)
        sigma[0] = torch.arange(m, device=device)
        log_seq = self._sequential_log_prob(logits, sigma[:, act, :m_a], sizes_a, valid)  # [K, Ca]
        log_seq_graph = torch.zeros(k, b, dtype=torch.float64, device=device).index_add_(1, class_graph[act], log_seq)
        lam = self.uniform_fraction
        log_nu = torch.logaddexp(
            torch.full_like(log_seq_graph, math.log(lam)),
            math.log1p(-lam) + log_order.view(1, b) + log_seq_graph,
        ) if lam < 1 else torch.zeros_like(log_seq_graph)
        enumerated = log_order <= math.log(self.max_candidates) + 1e-9
        log_nu = torch.where(enumerated.view(1, b), torch.zeros_like(log_nu), log_nu)
        return sigma, log_nu.t().contiguous()

    @staticmethod
    def _sequential_log_prob(logits: Tensor, sigma: Tensor, sizes: Tensor, valid: Tensor) -> Tensor:
        """Log probability of rank permutations ``sigma [K, C, m]`` under the sequential softmax."""
        k, c, m = sigma.shape
        available = valid.unsqueeze(0).expand(k, c, m).clone()
        total = torch.zeros(k, c, dtype=torch.float64, device=sigma.device)
        for r in range(m - 1):  # the last member's factor is 1
            active = (sizes > r + 1).view(1, c)
            row = torch.where(available, logits[:, r].unsqueeze(0), -math.inf)
            chosen = torch.gather(row, 2, sigma[:, :, r : r + 1]).squeeze(-1)
            step = chosen - torch.logsumexp(row, -1)
            total = total + torch.where(active, step, torch.zeros_like(step))
            available &= ~(torch.nn.functional.one_hot(sigma[:, :, r], m).bool() & active.unsqueeze(-1))
        return total

    def random_element(self, ctx: OrbitContext, generator=None) -> OrbitCandidates:
        members, sizes, _, _ = self._classes(ctx)
        sigma = self._uniform_ranks(1, sizes, members.size(1), generator, members.device)
        return OrbitCandidates(ctx.num_graphs, perm=_perm_from_class_ranks(sigma, members, ctx.x0.size(0)))


class ExplicitPermutations(Orbit):
    """A finite group of node permutations given per graph, e.g. graph automorphisms.

    The batch carries a node attribute ``key`` of shape ``[N, A]``: column ``a`` holds, for each
    node, the *local* index (within its graph) of the node it takes its position from under the
    ``a``-th permutation; ``-1`` pads graphs with fewer than ``A`` permutations. Column 0 must be
    the identity. Local indices batch correctly with PyG (no increment is needed), and the key must
    not contain ``"index"`` (PyG would offset it).

    The list is used as given (exact enumeration, ``log nu = 0``); list each element once.

    Example:
        >>> import torch
        >>> from torch_geometric.data import Data
        >>> from orbit_pyg.orbits import ExplicitPermutations, OrbitContext
        >>> d = Data(pos=torch.randn(3, 3), orbit_perm=torch.tensor([[0, 0], [1, 2], [2, 1]]))
        >>> ctx = OrbitContext(x0=d.pos, xt=d.pos, batch=torch.zeros(3, dtype=torch.long), num_graphs=1, data=d)
        >>> ExplicitPermutations().candidates(ctx).perm.tolist()
        [[0, 1, 2], [0, 2, 1]]
    """

    def __init__(self, key: str = "orbit_perm"):
        if "index" in key:
            raise ValueError(f"key {key!r} contains 'index': PyG would offset it when batching")
        self.key = key

    def _repr_args(self) -> dict:
        return {"key": self.key}

    def candidates(self, ctx: OrbitContext, generator=None) -> OrbitCandidates:
        local = ctx.node_attr(self.key).long()
        if local.dim() == 1:
            local = local.unsqueeze(1)
        n, a = local.shape
        offset = ctx.ptr[:-1][ctx.batch].view(n, 1)
        valid_node = local >= 0
        counts = torch.bincount(ctx.batch, minlength=ctx.num_graphs)
        # a column is a valid element of a graph when all that graph's entries are >= 0
        invalid_count = torch.zeros(ctx.num_graphs, a, dtype=torch.long, device=local.device)
        invalid_count.index_add_(0, ctx.batch, (~valid_node).long())
        mask = invalid_count == 0
        if bool((local >= counts[ctx.batch].view(n, 1)).any()):
            raise ValueError(f"`{self.key}` holds a local index beyond its graph's node count")
        ident = torch.arange(n, device=local.device).view(n, 1)
        glob = torch.where(valid_node, local + offset, ident)
        if not bool((glob[:, 0] == ident[:, 0]).all()):
            raise ValueError(f"column 0 of `{self.key}` must be the identity permutation")
        return OrbitCandidates(ctx.num_graphs, perm=glob.t().contiguous(), perm_mask=mask)

    def random_element(self, ctx: OrbitContext, generator=None) -> OrbitCandidates:
        cands = self.candidates(ctx)
        # one valid column per graph, uniformly
        u = torch.rand(cands.perm_mask.shape, generator=generator, device=ctx.x0.device)
        col = torch.where(cands.perm_mask, u, -1.0).argmax(1)  # [B]
        perm = cands.perm.t()[torch.arange(ctx.x0.size(0), device=ctx.x0.device), col[ctx.batch]]
        return OrbitCandidates(ctx.num_graphs, perm=perm.unsqueeze(0))


class FiniteGroup(Orbit):
    """A finite group of 3×3 linear maps acting on every node, given by its elements ``[G, 3, 3]``.

    Enumerated exactly (``log nu = 0``). The identity is moved to the front (added if absent).
    Use it for point groups, ``{I, -I}``, or basis relabellings of fractional coordinates.

    Example:
        >>> import torch
        >>> inversion = FiniteGroup(torch.stack([torch.eye(3), -torch.eye(3)]))
        >>> inversion
        FiniteGroup(order=2)
    """

    def __init__(self, elements: Tensor, needs_centering: bool = True):
        elements = torch.as_tensor(elements, dtype=torch.float64)
        if elements.dim() != 3 or elements.shape[1:] != (3, 3) or elements.size(0) < 1:
            raise ValueError(f"`elements` must have shape [G, 3, 3] with G >= 1, got {list(elements.shape)}")
        eye = torch.eye(3, dtype=torch.float64)
        is_id = (elements - eye).abs().amax((1, 2)) < 1e-9
        rest = elements[~is_id]
        self.elements = torch.cat([eye.unsqueeze(0), rest])
        self.needs_centering = needs_centering

    def _repr_args(self) -> dict:
        return {"order": self.elements.size(0)}

    def candidates(self, ctx: OrbitContext, generator=None) -> OrbitCandidates:
        g = self.elements.to(ctx.x0.device)
        return OrbitCandidates(ctx.num_graphs, linear=g.expand(ctx.num_graphs, -1, -1, -1))

    def random_element(self, ctx: OrbitContext, generator=None) -> OrbitCandidates:
        g = self.elements.to(ctx.x0.device)
        pick = torch.randint(0, g.size(0), (ctx.num_graphs,), generator=generator, device=ctx.x0.device)
        return OrbitCandidates(ctx.num_graphs, linear=g[pick].unsqueeze(1))
