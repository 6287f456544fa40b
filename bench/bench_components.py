"""Near-duplicate pictures from a stream of edge batches: memex's Components (memex/index.py), which folds its
buffered edges into a forest as they come, against the plain alternative on the same input, scipy's
connected_components over every edge at once. Both must give the same components (checked).

The stream is what near_duplicates feeds it: one batch of edges per 4,096-query search, here copies of images
stored 5 times each (every pair, both ways: 20 edges a picture), shuffled, with a forest that outgrows `buffer`
(a small buffer keeps the run short; memex's default is 4M pairs). `--old` also runs the rule before
2026-12-07's change, which counted the forest in the buffer and so folded the whole forest at every add once it
held more than `buffer` pairs: its fold count and time (with today's fold, a sort where it called np.unique,
so its time understates the old code's: ~6x slower a fold on numpy 2.4).

    python bench/bench_components.py [--pictures 50000] [--copies 5] [--batch 4096] [--buffer 100000] [--old]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memex.index import Components, pictures_of  # noqa: E402


class Counted(Components):
    """memex's Components, counting its folds."""

    folds = 0

    def _fold(self) -> None:
        self.folds += 1
        super()._fold()


class Before(Counted):
    """The rule before the change: fold when the forest plus the new edges pass `buffer`."""

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self._a.append(np.asarray(a, np.int64).ravel())
        self._b.append(np.asarray(b, np.int64).ravel())
        self._n += len(self._a[-1])
        if self._n > self.buffer:
            self._fold()


def stream(pictures: int, copies: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Edges (a, b) among `pictures` x `copies` ids: every ordered pair of a picture's copies, shuffled."""
    n = pictures * copies
    ids = np.random.default_rng(seed).permutation(n).reshape(pictures, copies)  # a picture's copies lie anywhere
    i, j = np.nonzero(~np.eye(copies, dtype=bool))
    a, b = ids[:, i].ravel(), ids[:, j].ravel()
    order = np.random.default_rng(seed + 1).permutation(len(a))
    return a[order].astype(np.int64), b[order].astype(np.int64), n


def measured(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak / 2**20


def by_components(batches, cls=Counted, buffer: int = 1 << 22):
    """The batches added as they come; the forest's pairs (id, root) at the end."""
    c = cls(buffer=buffer)
    for a, b in batches:
        c.add(a, b)
    return c.pairs(), c.folds


def by_scipy(batches, n):
    """Every edge held, then one sparse graph of all n ids: each id labelled with its component's smallest."""
    a, b = np.concatenate([a for a, _ in batches]), np.concatenate([b for _, b in batches])
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    first = np.full(label.max() + 1, n, np.int64)
    np.minimum.at(first, label, np.arange(n))
    return first[label]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pictures", type=int, default=50_000)
    ap.add_argument("--copies", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4096, help="edges an add (near_duplicates: a search batch's)")
    ap.add_argument("--buffer", type=int, default=100_000)
    ap.add_argument("--old", action="store_true", help="also run the rule before the change (slow: a fold an add)")
    o = ap.parse_args()
    a, b, n = stream(o.pictures, o.copies)
    batches = [(a[s:s + o.batch].copy(), b[s:s + o.batch].copy()) for s in range(0, len(a), o.batch)]
    del a, b  # the stream's batches alone, as near_duplicates makes them one search at a time
    forest = o.pictures * (o.copies - 1)
    print(f"{sum(len(x) for x, _ in batches):,} edges among {n:,} ids ({o.pictures:,} pictures of {o.copies}) in "
          f"{len(batches):,} adds of {o.batch:,}; buffer {o.buffer:,}, final forest {forest:,} pairs")
    (pairs, folds), t_c, m_c = measured(lambda: by_components(batches, Counted, o.buffer))
    want, t_s, m_s = measured(lambda: by_scipy(batches, n))
    assert np.array_equal(pictures_of(np.arange(n), pairs), want), "Components and connected_components differ"
    print(f"{'side':34s} {'seconds':>8s} {'peak MiB':>9s} {'folds':>6s}")
    print(f"{'Components (memex), streamed':34s} {t_c:8.2f} {m_c:9.1f} {folds:6d}")
    print(f"{'connected_components, all at once':34s} {t_s:8.2f} {m_s:9.1f} {1:6d}")
    print(f"Components / scipy: {t_c / t_s:.2f}x the time, {m_c / m_s:.2f}x the peak memory; equal components")
    if o.old:
        (old, old_folds), t_o, m_o = measured(lambda: by_components(batches, Before, o.buffer))
        assert np.array_equal(pictures_of(np.arange(n), old), want), "the old rule's components differ"
        print(f"{'Components, old rule (before)':34s} {t_o:8.2f} {m_o:9.1f} {old_folds:6d}")
        print(f"old / memex: {t_o / t_c:.1f}x the time, {old_folds / folds:.0f}x the folds")

if __name__ == "__main__":
    main()
