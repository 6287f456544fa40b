"""The filter step of generate-and-filter extraction (docs/method.md#filter-cliques).

Per prompt: a graph over its generations (about 500) with an edge where two generations are
within `threshold` (tiled l2); the prompt is flagged when the largest clique has at least
`min_clique` members (10 in the paper). No training image is needed.

Maximum clique is NP-hard, so `largest_clique` brackets it and searches only where the bracket
is open:
1. lower bound: greedy cliques grown from the 32 highest-degree vertices (always a real clique);
2. upper bound: min(max core number + 1, colours of a greedy smallest-last colouring);
3. if they differ, an exact colour-bounded branch and bound (Tomita's MCQ on Python-int bitsets),
   restricted to the k-core with k = the clique size to beat (a (k+1)-clique lies in the k-core)
   and limited to `max_expansions` search nodes in all. It runs twice when the decision is open
   (lower < min_clique <= upper): first it only looks for a clique of >= min_clique members,
   which prunes hardest, then it looks for the maximum with the budget left.

What the result guarantees:
- `members` is always a real clique, so `size` is a lower bound of the maximum clique size;
- `upper_bound` is proven: no clique is larger (colouring bounds, plus the search's own bound
  when it stopped early: the colour of the top-level branch it was in);
- `exact` is True exactly when size == upper_bound, i.e. `members` is a maximum clique;
- `flagged = size >= min_clique` is certain when size >= min_clique or upper_bound < min_clique;
  it can only miss a prompt when exact is False and upper_bound >= min_clique. It never flags a
  prompt wrongly.
The real graphs are easy (a prompt's generations are either spread out, few edges, or collapse
to one image, a near-complete cluster). Measured at 500 nodes on one CPU core: 10-40 ms for
sparse graphs, a planted 40-clique or a complete graph; up to ~0.6 s for 80%-dense geometric
(threshold) graphs, all exact. Dense random graphs (edge probability >= 0.5) use up the default
budget in 5-15 s (~30-60 us per search node) and come back with exact=False.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memex.config import MemexError

N_SEEDS = 32  # greedy starts; each costs at most (clique size) numpy sums over the candidates


class CliqueError(MemexError, ValueError):
    """A malformed distance matrix or adjacency, or a bad parameter; the message says what to pass."""


@dataclass
class CliqueResult:
    members: list[int]  # sorted node indices of the clique found
    size: int  # len(members): a lower bound of the maximum clique size
    upper_bound: int  # proven: no clique has more members
    exact: bool  # size == upper_bound: members is a maximum clique


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def adjacency(dist: torch.Tensor | np.ndarray, threshold: float) -> np.ndarray:
    """(n, n) distances -> (n, n) bool, edge where dist <= threshold both ways, no self loops.

    Requiring both directions makes it symmetric even when float rounding makes dist[i, j] and
    dist[j, i] differ in the last bit; nan distances give no edge.
    """
    d = _numpy(dist)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise CliqueError(f"adjacency needs a square (n, n) distance matrix, e.g. tiled_l2_pairwise(x, x); "
                          f"got shape {d.shape}")
    adj = (d <= threshold) & (d.T <= threshold)
    np.fill_diagonal(adj, False)
    return adj


def _cores(adj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Core numbers and the removal order of the min-degree peeling (O(n^2), ~5 ms at n = 500)."""
    n = adj.shape[0]
    deg = adj.sum(1).astype(np.int64)
    left = np.ones(n, bool)
    core, order, k = np.zeros(n, np.int64), np.empty(n, np.int64), 0
    for i in range(n):
        v = int(np.argmin(np.where(left, deg, n)))
        k = max(k, int(deg[v]))
        core[v], order[i], left[v] = k, v, False
        deg -= adj[v]
    return core, order


def _colour_count(adj: np.ndarray, order: np.ndarray) -> int:
    """Colours used by greedy colouring in `order` (smallest-last gives <= degeneracy + 1)."""
    n = adj.shape[0]
    colour = np.full(n, -1, np.int64)
    for v in order:
        used = np.zeros(n + 1, bool)
        used[colour[adj[v] & (colour >= 0)]] = True
        colour[v] = int(np.argmin(used))
    return int(colour.max()) + 1 if n else 0


def _greedy(adj: np.ndarray, deg: np.ndarray, stop_at: int) -> list[int]:
    """Best clique grown from the top-degree seeds, each step adding the candidate with most
    neighbours among the remaining candidates; stops early once a clique reaches `stop_at`."""
    best: list[int] = []
    for s in np.argsort(-deg, kind="stable")[:N_SEEDS]:
        if s in best:  # grown through already; in dense clusters it would find the same clique again
            continue
        clique, cand = [int(s)], np.flatnonzero(adj[s])
        inner = adj[np.ix_(cand, cand)].sum(1)  # neighbours of each candidate among the candidates
        while cand.size and len(clique) + cand.size > len(best):
            if inner.min() == cand.size - 1:  # the candidates are a clique: take them all
                clique += cand.tolist()
                break
            v = int(cand[np.argmax(inner)])
            clique.append(v)
            keep = adj[v, cand]
            gone, cand = cand[~keep], cand[keep]
            # update the counts for the dropped candidates only: O(|cand|^2) per seed in all
            inner = inner[keep] - adj[np.ix_(cand, gone)].sum(1)
        if len(clique) > len(best):
            best = clique
        if len(best) >= stop_at:
            break
    return best


def _colour_sort(p: int, nbr: list[int], kmin: int) -> tuple[list[int], list[int]]:
    """Greedy colouring of the vertex bitset p, lowest bit first. Returns the vertices of colour
    > kmin in colour order and their colours: the vertices of p up to order[i] can be coloured with
    bounds[i] colours, so no clique among them has more than bounds[i] members. Vertices of colour
    <= kmin could never beat the best clique as the newest member, so they are not listed (they
    stay in p, as candidates of deeper levels)."""
    order, bounds, k = [], [], 0
    while p:
        k += 1
        q = p
        while q:
            v = (q & -q).bit_length() - 1
            q &= ~nbr[v] & ~(1 << v)
            p &= ~(1 << v)
            if k > kmin:
                order.append(v)
                bounds.append(k)
    return order, bounds


def _search(nbr: list[int], p: int, floor: int, budget: int,
            stop_at: int | None = None) -> tuple[list[int], int, int]:
    """Largest clique of more than `floor` members inside the bitset p (MCQ, iterative).

    Returns (clique or [], bound, expansions used). bound is proven for cliques inside p, given
    that the caller knows of a clique of `floor` members or that none larger exists outside p.
    `stop_at`: return as soon as a clique of that many members is found (the decision pass); the
    bound returned is then the colour bound of the top-level branch in progress, as when the budget
    runs out.
    """
    best: list[int] = []
    order, bounds = _colour_sort(p, nbr, floor)
    stack = [[[], p, order, bounds]]  # frames: clique so far, candidates left, colour order, colours
    used, top = 0, max(bounds, default=floor)  # top: colour bound of the top-level branch in progress
    while stack:
        frame = stack[-1]
        clique, cand, order, bounds = frame
        if not order or len(clique) + bounds[-1] <= floor:
            stack.pop()
            continue
        if used >= budget:  # unexplored cliques: inside the top-level branch we were in
            return best, max(floor, top), used
        v, colours = order.pop(), bounds.pop()
        if len(stack) == 1:
            top = colours
        used += 1
        frame[1] = cand & ~(1 << v)
        grown, left = clique + [v], cand & nbr[v]
        if not left:
            if len(grown) > floor:
                best, floor = grown, len(grown)
                if stop_at is not None and floor >= stop_at:  # decided: the maximum is the next pass's
                    return best, max(floor, top), used
        else:
            stack.append([grown, left, *_colour_sort(left, nbr, floor - len(grown))])
    return best, floor, used


def largest_clique(adj: np.ndarray, min_clique: int, max_expansions: int = 200_000) -> CliqueResult:
    """Largest clique of a symmetric bool adjacency without self loops (see the module docstring
    for what is guaranteed when the search budget `max_expansions` runs out)."""
    adj = np.asarray(adj, dtype=bool)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1] or not np.array_equal(adj, adj.T) or adj.diagonal().any():
        raise CliqueError("largest_clique needs a symmetric (n, n) bool adjacency with a False diagonal; "
                          "build it with memex.cliques.adjacency(dist, threshold)")
    if min_clique < 1 or max_expansions < 0:
        raise CliqueError(f"need min_clique >= 1 (the paper uses 10) and max_expansions >= 0; "
                          f"got {min_clique} and {max_expansions}")
    n = adj.shape[0]
    if n == 0:
        return CliqueResult([], 0, 0, True)
    core, removal = _cores(adj)
    upper = min(int(core.max()) + 1, _colour_count(adj, removal[::-1]))
    best = _greedy(adj, adj.sum(1), stop_at=upper)

    # Bitsets in (core, degree)-descending order: colouring takes the lowest bit first, so the
    # dense part is coloured first (tighter bounds, the MCQ initial order).
    perm = np.lexsort((-adj.sum(1), -core))
    rows = np.packbits(adj[np.ix_(perm, perm)], axis=1, bitorder="little")
    nbr = [int.from_bytes(r.tobytes(), "little") for r in rows]

    def within(k: int) -> int:  # bitset of the k-core, which holds every clique of > k members
        return sum(1 << i for i in np.flatnonzero(core[perm] >= k).tolist())

    budget = max_expansions
    if len(best) < min_clique <= upper:  # decide first: is there any clique of >= min_clique?
        found, bound, used = _search(nbr, within(min_clique - 1), min_clique - 1, budget, stop_at=min_clique)
        budget -= used
        if found:
            best = perm[found].tolist()
        upper = min(upper, max(bound, len(best)))
    if len(best) < upper:
        found, bound, _ = _search(nbr, within(len(best)), len(best), budget)
        if found:
            best = perm[found].tolist()
        upper = min(upper, max(bound, len(best)))
    return CliqueResult(sorted(best), len(best), upper, len(best) == upper)


def representative(members: list[int], dist: torch.Tensor | np.ndarray) -> int:
    """The medoid of the clique: the member with the smallest sum of distances to the others
    (ties: the first in `members`)."""
    if not members:
        raise CliqueError("representative needs at least one member; check CliqueResult.size > 0")
    m = np.asarray(members)
    sub = _numpy(dist)[np.ix_(m, m)]
    return int(m[int(np.argmin(sub.sum(1)))])
