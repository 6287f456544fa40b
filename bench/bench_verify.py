"""The match stage's pixel check at real shapes: training images cut once (match.Compared) against
cut for every pair.

    python bench/bench_verify.py --run runs/demo-342d6d154f        # a finished `memex audit` (the demo's)

Verification (memex/stages/match.py verify_all) compares each generation with its k nearest training
images by embedding: each training image is cut to the generation's aspect and resized to the pair's
common size, then the tiled l2 is taken. At 512 px generations and 1024x768 LAION-style training
images the cut and resize is ~25 ms and the distance ~1.5 ms, and the generations of a shard share
many neighbours. Both sides run verify_all on the same inputs and must return the same rows:
  plain  each training image cut for every pair (memex before match.Compared)
  memex  one match.Compared for the stage: each (training image, shape) cut once, kept across shards
The neighbour lists are the real ones: the run's own generations searched in its own index (the
match stage's Neighbours, resources.executor=local), so the reuse is the run's. The pixels are
synthetic at the real shapes: a smooth 512x512 generation per sample and a 768x1024 image per training
row. Medians of --repeats alternating runs, one thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Plain:
    """The old path: every pair cuts its training image again."""

    def __init__(self, preprocess: str):
        self.preprocess = preprocess

    def get(self, gid, luma, image, shape):
        from memex.stages.match import as_compared

        return as_compared(image(), shape, self.preprocess)


def smooth(rng, h: int, w: int) -> np.ndarray:
    """A smooth uint8 (h, w, 3) picture: an 8x8 colour grid upsampled (no two alike)."""
    from PIL import Image

    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished memex audit's run folder (its index and samples)")
    ap.add_argument("--shards", type=int, default=2, help="samples shards verified (each side, each repeat)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=512, help="generation side (px)")
    a = ap.parse_args()

    import pyarrow as pa
    import torch

    from memex.images import encode_png
    from memex.layout import RunLayout
    from memex.membership import read_info, read_pictures
    from memex.stages.match import Compared, verify_all
    from memex.stages.nearest import Neighbours

    torch.set_num_threads(1)
    layout = RunLayout.at(a.run)
    info = read_info(layout)
    run_cfg = layout.store.read_json(layout.run_json)
    sys.path.insert(0, str(REPO / "bench"))
    from audit_vs_truth import compose

    root = str(Path(a.run).resolve().parent)
    cfg = compose([f"storage.root={root}", "resources.executor=local", "resources.device=cpu"])
    m, preprocess = cfg.match, cfg.trainset.preprocess.value
    shards = layout.samples.complete()[: a.shards]
    rng = np.random.default_rng(0)
    units = []
    with Neighbours(cfg, info, store=layout.store) as nearest:
        for s in shards:
            t = layout.store.read_table(layout.samples.file(s), columns=["sample_id", "prompt_id", "prompt", "image"])
            D, I = nearest(t["image"].to_pylist(), m.k)
            gen = [encode_png(smooth(rng, a.size, a.size)) for _ in range(t.num_rows)]
            units.append((t.set_column(3, "image", pa.array(gen, pa.binary())), D, I))
    gids = sorted({int(g) for _, _, I in units for g in I.ravel() if g >= 0})
    pixels = {g: smooth(rng, 768, 1024) for g in gids}
    meta = {g: (f"t{g}", "") for g in gids}
    picture = read_pictures(info, cfg.storage.options, np.array(gids))
    pairs = sum(int((I >= 0).sum()) for _, _, I in units)
    print(f"run {a.run} (generated with {run_cfg.get('sampling', {}).get('samples_per_prompt', '?')} samples a "
          f"prompt): {len(units)} shards, {sum(u[0].num_rows for u in units)} generations, {pairs} pairs, "
          f"{len(gids)} distinct training rows ({pairs / len(gids):.1f} pairs each); generations {a.size}x{a.size}, "
          f"training images 768x1024, k={m.k}, one thread")

    def run(kind: str) -> tuple[float, list, object]:
        cache = Plain(preprocess) if kind == "plain" else Compared(preprocess)
        t0 = time.perf_counter()
        rows = [verify_all(t, D, I, pixels, meta, m, info.metric, preprocess, picture, cache) for t, D, I in units]
        return time.perf_counter() - t0, rows, cache

    times: dict[str, list[float]] = {"plain": [], "memex": []}
    for r in range(a.repeats):
        for kind in (("plain", "memex") if r % 2 == 0 else ("memex", "plain")):
            seconds, rows, cache = run(kind)
            times[kind].append(seconds)
            if kind == "plain":
                want = rows
            else:
                got, made = rows, cache.made
    assert got == want, "memex's rows differ from the plain path's"
    p, q = statistics.median(times["plain"]), statistics.median(times["memex"])
    print(f"{'side':<6} {'median s':>9} {'min-max s':>13} {'ms/pair':>8} {'cuts':>6}")
    print(f"{'plain':<6} {p:9.2f} {min(times['plain']):6.2f}-{max(times['plain']):<6.2f} {1e3 * p / pairs:8.2f} "
          f"{'all':>6}")
    print(f"{'memex':<6} {q:9.2f} {min(times['memex']):6.2f}-{max(times['memex']):<6.2f} {1e3 * q / pairs:8.2f} "
          f"{made:>6}")
    print(f"memex / plain: {p / q:.2f}x faster, the same {sum(len(r) for r in want)} rows")


if __name__ == "__main__":
    main()
