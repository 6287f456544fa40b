"""`memex train`'s duplication schedule on a large manifest: memex's expand_duplicates against the same
schedule applied the way it was before 2026-12-07, which rebuilt a set of the group's ids for every free
id and counted each id with list.count (quadratic in a group's ids). Both give the same rows (checked).

    python bench/bench_duplicates.py [--rows 50000] [--named 5000] [--count 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memex.config import DuplicationGroup  # noqa: E402
from memex.manifest import expand_duplicates  # noqa: E402


def before(ids: list[str], schedule: list[DuplicationGroup], seed: int = 0) -> dict[str, int]:
    """The copies each id got, as the code before the change chose them (its two quadratic lines kept)."""
    copies = {i: 1 for i in ids}
    free = list(ids)
    random.Random(seed).shuffle(free)
    named = {i for g in schedule for i in g.ids}
    free = [i for i in free if i not in named]
    scheduled: set[str] = set()
    for g in schedule:
        assert not sorted({i for i in g.ids if i in scheduled or g.ids.count(i) > 1})
        chosen = list(g.ids)
        free = [i for i in free if i not in set(chosen)]
        chosen += free[: g.count]
        free = free[g.count:]
        for i in chosen:
            copies[i] = g.copies
        scheduled.update(chosen)
    return copies


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--named", type=int, default=5_000, help="ids the group names")
    ap.add_argument("--count", type=int, default=10, help="more images the group picks at random")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    ids = [f"img-{k:07d}" for k in range(a.rows)]
    table = pa.table({"id": ids, "image": [b"x"] * a.rows})
    schedule = [DuplicationGroup(copies=2, count=a.count, ids=ids[: a.named])]
    out = expand_duplicates(table, schedule)
    want = before(ids, schedule)
    got = dict(zip(out["source_id"].to_pylist(), out["copies"].to_pylist()))
    assert got == want, "the two schedules differ"
    t_memex = best(lambda: expand_duplicates(table, schedule), a.repeats)
    t_before = best(lambda: before(ids, schedule), a.repeats)
    print(f"{a.rows:,} rows, a group naming {a.named:,} ids (+{a.count} at random): {out.num_rows:,} rows out, "
          f"the same copies per id")
    print(f"expand_duplicates (memex)     {t_memex:8.3f} s")
    print(f"before (set per free id)      {t_before:8.3f} s")
    print(f"ratio                         {t_before / t_memex:8.1f}x faster")


if __name__ == "__main__":
    main()
