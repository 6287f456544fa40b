"""A `memex mia` LiRA resume's check of the shadows trained before (memex.stages.mia.check_trained_shadows):
each complete shadow scanning every row of shadows/ (memex before: S x S x N rows looked at) against the rows
grouped by shadow once.

    python bench/bench_mia_resume.py                          # 16 shadows of 50,000 images (800,000 rows)
    python bench/bench_mia_resume.py --shadows 64 --images 10000

Both sides get the same shadows/ table (shadow, image_id, in_training, loss: S x N rows, each shadow a random half)
through a stand-in for layout.shadows (complete, read, read_marker), the same planned steps and halves, and must
give the same verdict (asserted: none, the plan is the one trained; then one shadow's half changed, named the same).
  old    the function as it was (copied here; tests/test_mia_resume.py takes its verdicts as the reference)
  memex  memex.stages.mia.check_trained_shadows
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from memex.config import ConfigError
from memex.stages.mia import check_trained_shadows


def old_check_trained_shadows(folder, steps, inside=None):
    done = folder.complete()
    trained = folder.read(columns=["shadow", "image_id", "in_training"]).to_pylist() if inside and done else []
    for s in done:
        had = (folder.read_marker(s) or {}).get("training_steps")
        if s in steps and had != steps[s]:
            raise ConfigError(f"shadow model {s} in {folder.store.uri_of(folder.path)} was trained for {had} steps "
                              f"and this run trains it for {steps[s]} (as many passes over its images as the "
                              f"target made): remove {folder.store.uri_of(folder.path)} to train the shadows again")
        other = [r["image_id"] for r in trained if r["shadow"] == s and inside and s in inside
                 and inside[s].get(r["image_id"], r["in_training"]) != r["in_training"]]
        if other:
            raise ConfigError(f"shadow model {s} in {folder.store.uri_of(folder.path)} was trained on another half of "
                              f"the images than this run plans ({len(other)} differ, e.g. {other[0]}): remove "
                              f"{folder.store.uri_of(folder.path)} to train the shadows again")


class Shadows:
    def __init__(self, table: pa.Table, steps: dict[int, int]):
        self.table, self.steps, self.path = table, steps, "shadows"
        self.store = SimpleNamespace(uri_of=lambda p: f"/runs/r/mia/{p}")

    def complete(self):
        return sorted(self.steps)

    def read(self, columns=None):
        return self.table.select(columns) if columns else self.table

    def read_marker(self, s):
        return {"training_steps": self.steps[s]}


def timed(fn, *args) -> tuple[float, str | None]:
    t = time.perf_counter()
    try:
        fn(*args)
        out = None
    except ConfigError as e:
        out = str(e)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shadows", type=int, default=16)
    ap.add_argument("--images", type=int, default=50_000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    ids = [f"laion-{j:07d}" for j in range(a.images)]
    split = rng.random((a.shadows, a.images)) < 0.5
    table = pa.table({"shadow": pa.array(np.repeat(np.arange(a.shadows), a.images), pa.int32()),
                      "image_id": ids * a.shadows, "in_training": split.ravel(),
                      "loss": np.zeros(a.shadows * a.images, np.float32)})
    steps = {s: 1000 for s in range(a.shadows)}
    inside = {s: dict(zip(ids, split[s].tolist())) for s in range(a.shadows)}
    print(f"{a.shadows} shadows x {a.images:,} images: {table.num_rows:,} rows of shadows/; "
          f"old looks at {a.shadows * table.num_rows:,} rows")
    print(f"{'plan':<26} {'old s':>8} {'memex s':>8} {'speed-up':>9}  same verdict")
    changed = {**inside, a.shadows - 1: {**inside[a.shadows - 1], ids[-1]: not inside[a.shadows - 1][ids[-1]]}}
    for name, plan in (("as trained", inside), ("last shadow's half changed", changed)):
        t_old, v_old = timed(old_check_trained_shadows, Shadows(table, steps), steps, plan)
        t_new, v_new = timed(check_trained_shadows, Shadows(table, steps), steps, plan)
        assert v_old == v_new, (v_old, v_new)
        print(f"{name:<26} {t_old:>8.2f} {t_new:>8.2f} {t_old / t_new:>8.1f}x  {v_new is None and 'none' or 'refused'}")


if __name__ == "__main__":
    main()
