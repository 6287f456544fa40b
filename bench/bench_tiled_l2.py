"""Pairwise tiled l2 (the filter's all-pairs distance): memex's blocked matmul against the previous implementation.

    python bench/bench_tiled_l2.py [--sizes 16 64 500 --px 512 --repeats 3 --old-max 64 --old-repeats 1]

Workload: what the filter stage does for one prompt, N generations of px x px RGB decoded as uint8
(N, H, W, 3), all pairs of one set. Every case starts from the same uint8 images (a quarter exact
copies of image 0, a quarter near copies within +-3/255, the rest noise) and runs in a fresh
subprocess, so its peak resident memory (resource.getrusage ru_maxrss) is its own; "extra" is that
peak minus the resident size once the uint8 images exist (torch and the images themselves excluded).

    old        today's filter path before this change: to_unit (float32 copy of all N images), then the
               plain implementation copied below, which materialises chunk x N x 3 x H x W differences
               (default chunk 256 rows: at N = 64 that is 26 GB, more than this machine has, so it runs with
               the largest chunk whose two temporaries fit in --old-mem-gib, 4 GiB)
    new uint8  memex.distances.tiled_l2_pairwise on the uint8 images, converted block by block
    new float  the same on to_unit's float32 copy (what callers that already hold floats pay)

Timings: one warm-up call on 2 images, then `repeats` calls (`old-repeats` for the old one, whose
calls take seconds to minutes); the median is reported. The old implementation runs only up to
--old-max images (at N = 500 it would take ~20 min per call), and its numbers are compared with the
new ones (max absolute difference); above that its time is extrapolated as N^2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from memex.distances import GRID, _common, tiled_l2_pairwise, to_unit


def plain_tiled_l2_pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The implementation before bounded memory, verbatim: chunk x M x C x H x W differences per step."""
    a, b = _common(a, b)
    n, c, h, w = a.shape
    tb = b.reshape(b.shape[0], c, GRID, h // GRID, GRID, w // GRID)
    out = []
    for i in range(0, n, chunk):
        ta = a[i : i + chunk].reshape(-1, 1, c, GRID, h // GRID, GRID, w // GRID)
        d = (ta - tb.unsqueeze(0)).pow(2).mean(dim=(2, 4, 6)).sqrt()  # (chunk, M, 4, 4)
        out.append(d.flatten(2).max(dim=2).values)
    return torch.cat(out)


def images(n: int, px: int) -> torch.Tensor:
    """(n, px, px, 3) uint8, generated in place (no int64 temporary that would raise the peak)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, px, px, 3), dtype=torch.uint8, generator=g)
    for i in range(1, n):
        if i % 4 == 1:
            x[i] = x[0]
        elif i % 4 == 2:
            x[i] = (x[0].to(torch.int16) + torch.randint(-3, 4, x[0].shape, generator=g, dtype=torch.int16)
                    ).clamp_(0, 255).to(torch.uint8)
    return x


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(impl: str, n: int, px: int, chunk: int, repeats: int, out: str) -> None:
    x = images(n, px)
    base = rss_mib()
    if impl == "old":
        fn = lambda u: plain_tiled_l2_pairwise(f := to_unit(u), f, chunk)  # noqa: E731
    elif impl == "new-float":
        fn = lambda u: tiled_l2_pairwise(f := to_unit(u), f)  # noqa: E731
    else:
        fn = lambda u: tiled_l2_pairwise(u, u)  # noqa: E731
    fn(x[:2].clone())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        d = fn(x)
        times.append(time.perf_counter() - t)
    np.save(out, d.numpy())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"times": times, "base_mib": base, "peak_mib": peak}))


def run_case(impl: str, n: int, px: int, chunk: int, repeats: int, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(n), str(px), str(chunk), str(repeats), out]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:100]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def old_chunk(n: int, px: int, mem_gib: float) -> int:
    """Largest row chunk whose two chunk x n x 3 x px x px float32 temporaries (difference, square) fit."""
    per_row = 2 * n * 3 * px * px * 4
    return max(1, min(256, n, int(mem_gib * 2**30 // per_row)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, n, px, chunk, repeats, out = sys.argv[2:8]
        child(impl, int(n), int(px), int(chunk), int(repeats), out)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 500], help="images per prompt (N)")
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old-max", type=int, default=64, help="run the old implementation up to this N")
    ap.add_argument("--old-repeats", type=int, default=1, help="timed calls of the old one (seconds to minutes each)")
    ap.add_argument("--old-mem-gib", type=float, default=4.0, help="memory for the old one's temporaries")
    ap.add_argument("--old-chunk", type=int, default=None,
                    help="the old one's row chunk, instead of the largest --old-mem-gib holds (1: its least memory, "
                         "so the memory ratio compares the algorithms and not the two budgets)")
    args = ap.parse_args()
    print(f"pairs of N x N images, {args.px}x{args.px} RGB uint8, threads={torch.get_num_threads()} "
          f"repeats={args.repeats} load average={os.getloadavg()[0]:.2f}")
    print(f"{'N':>4} {'implementation':<22} {'median s':>9} {'peak MiB':>9} {'extra MiB':>10} {'vs old':>16} "
          f"{'max |old-new|':>14}")
    last_old = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            rows = {}
            impls = (["old"] if n <= args.old_max else []) + ["new-uint8", "new-float"]
            for impl in impls:
                chunk = (args.old_chunk or old_chunk(n, args.px, args.old_mem_gib)) if impl == "old" else 0
                repeats = args.old_repeats if impl == "old" else args.repeats
                r = run_case(impl, n, args.px, chunk, repeats, f"{tmp}/{impl}-{n}.npy")
                name = f"old (chunk {chunk})" if impl == "old" else impl
                if "error" in r:
                    print(f"{n:>4} {name:<22} failed: {r['error']}")
                    continue
                med, extra = statistics.median(r["times"]), r["peak_mib"] - r["base_mib"]
                rows[impl] = (med, extra)
                ratio = diff = ""
                if impl != "old" and "old" in rows:
                    ratio = f"{rows['old'][0] / med:5.1f}x t {rows['old'][1] / extra:4.1f}x m"
                    d_old, d_new = np.load(f"{tmp}/old-{n}.npy"), np.load(f"{tmp}/{impl}-{n}.npy")
                    diff = f"{np.abs(d_old - d_new).max():.1e}"
                print(f"{n:>4} {name:<22} {med:9.3f} {r['peak_mib']:9.0f} {extra:10.0f} {ratio:>16} {diff:>14}")
            new = np.load(f"{tmp}/new-uint8-{n}.npy")
            copies = [i for i in range(1, n) if i % 4 == 1]
            exact = new[0, copies].max() if copies else 0
            print(f"{'':>4} new-uint8: exact copies of image 0 at distance {exact:.1e}, "
                  f"near copies {new[0, 2::4].max() if n > 2 else 0:.4f}, noise pairs ~{np.median(new):.3f}")
            if "old" in rows:
                last_old = (n, rows["old"][0])
            elif last_old and "new-uint8" in rows:
                est = last_old[1] * (n / last_old[0]) ** 2  # n^2 pairs, each the same elementwise work
                print(f"{'':>4} old, not run: ~{est:.0f} s extrapolated from N = {last_old[0]} "
                      f"(x (N / {last_old[0]})^2), {est / rows['new-uint8'][0]:.0f}x new-uint8")


if __name__ == "__main__":
    main()
