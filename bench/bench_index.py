"""memex's sharded FAISS index against brute-force numpy search: same vectors, same queries, top-10.

    python bench/bench_index.py [--n 200000 --d 64 --queries 1000 --shards 4 --threads 2 --repeats 3]

The plain alternative is what one writes by hand: squared L2 by the norm trick,
|q|^2 + |x|^2 - 2 q.x^T with one matrix product per chunk of queries, then argpartition for the
top 10 and a sort of those 10. It is exact, so it is also the reference for recall@10.
memex runs ShardedIndex with flat shards (exact) and with IVF-PQ shards (nlist lists, nprobe
visited, PQ codes re-ranked exactly over k x refine_k candidates), S shards searched one after
another and merged with merge_topk, as the in-process form of the Ray index stage.
The data is a Gaussian mixture (clustered, as image embeddings are), so IVF has structure to use.
Timings alternate the three methods `repeats` times after a warm-up and report medians; build
times are single runs (IVF-PQ: k-means on train_size vectors, then adding all of them).
"""

from __future__ import annotations

import os
import sys

# numpy's OpenBLAS reads its thread count once, at import: set it before numpy is imported so the
# numpy baseline and faiss (omp_set_num_threads below) use the same number of threads.
_THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "2")
os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = _THREADS

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from memex.index import IndexSpec, ShardedIndex  # noqa: E402


def mixture(n: int, centers: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    return (centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, centers.shape[1]))).astype(
        np.float32)


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int, chunk: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 top-k; chunk x n float32 distances at a time (250 x 200k: 200 MB)."""
    x_sq = (x * x).sum(1)  # (n,)
    D = np.empty((len(q), k), np.float32)
    I = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), chunk):
        qc = q[s : s + chunk]
        d2 = (qc * qc).sum(1)[:, None] + x_sq[None] - 2 * (qc @ x.T)  # (chunk, n)
        part = np.argpartition(d2, k, axis=1)[:, :k]  # unordered top k
        dk = np.take_along_axis(d2, part, 1)
        order = np.argsort(dk, axis=1)
        D[s : s + chunk] = np.take_along_axis(dk, order, 1)
        I[s : s + chunk] = np.take_along_axis(part, order, 1)
    return D, I


def recall(I: np.ndarray, ref: np.ndarray) -> float:
    k = ref.shape[1]
    hits = (I[:, :, None] == ref[:, None, :]).any(-1).sum()  # set overlap per query, vectorised
    return float(hits) / (len(ref) * k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="indexed vectors")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--centers", type=int, default=256, help="mixture components")
    ap.add_argument("--spread", type=float, default=0.5, help="per-dimension std around a center (centers: std 1)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--pq-m", type=int, default=16)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--refine-k", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    faiss.omp_set_num_threads(a.threads)

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((a.centers, a.d))
    x = mixture(a.n, centers, a.spread, rng)
    q = mixture(a.queries, centers, a.spread, rng)  # fresh draws from the same mixture

    flat_spec = IndexSpec(kind="flat", metric="l2")
    ivf_spec = IndexSpec(kind="ivfpq", metric="l2", nlist=a.nlist, pq_m=a.pq_m, nprobe=a.nprobe,
                         refine_k=a.refine_k, train_size=a.train_size)
    t0 = time.perf_counter()
    flat = ShardedIndex.build(x, a.shards, flat_spec)
    b_flat = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf = ShardedIndex.build(x, a.shards, ivf_spec)
    b_ivf = time.perf_counter() - t0

    methods = {"numpy brute force": lambda: numpy_topk(x, q, a.k),
               f"memex flat  S={a.shards}": lambda: flat.search(q, a.k),
               f"memex ivfpq S={a.shards}": lambda: ivf.search(q, a.k)}
    results = {name: fn() for name, fn in methods.items()}  # warm-up, and the results for recall
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(a.repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    ref_D, ref_I = results["numpy brute force"]
    base = statistics.median(times["numpy brute force"])
    builds = {"numpy brute force": None, f"memex flat  S={a.shards}": b_flat, f"memex ivfpq S={a.shards}": b_ivf}
    print(f"n={a.n} d={a.d} queries={a.queries} k={a.k} mixture={a.centers}x(spread {a.spread}) "
          f"shards={a.shards} ivfpq: nlist={a.nlist} PQ{a.pq_m}x8 nprobe={a.nprobe} refine_k={a.refine_k} "
          f"train_size={a.train_size} threads={a.threads} repeats={a.repeats}")
    print(f"{'method':<20} {'build s':>8} {'search s':>9} {'queries/s':>10} {'vs numpy':>9} {'recall@10':>10}")
    for name in methods:
        t = statistics.median(times[name])
        build = "-" if builds[name] is None else f"{builds[name]:.2f}"
        print(f"{name:<20} {build:>8} {t:>9.3f} {a.queries / t:>10.0f} {base / t:>8.2f}x "
              f"{recall(results[name][1], ref_I):>10.4f}")
    D_ivf, I_ivf = results[f"memex ivfpq S={a.shards}"]
    exact = ((x[I_ivf].astype(np.float64) - q[:, None].astype(np.float64)) ** 2).sum(-1)
    print(f"ivfpq re-ranked distances vs exact for the returned ids: max relative error "
          f"{float(np.max(np.abs(D_ivf - exact) / np.maximum(exact, 1e-12))):.1e}")


if __name__ == "__main__":
    main()
