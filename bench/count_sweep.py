"""What counts a picture, swept against brute-force truth over several audits: match.threshold x
match.min_generations, at each run seed.

    for s in 1 2 3; do
      python bench/audit_vs_truth.py --truth /tmp/truth-demo.parquet --strategy default --audit-seed $s \
          --root /tmp/avt/seed$s --rematch 0.1 --rematch 0.125 --rematch 0.175
    done
    python bench/count_sweep.py --truth /tmp/truth-demo.parquet --run '/tmp/avt/seed*/default/demo-*'

Each run folder is an audit (or a re-match of one at another match.threshold: run.samples_from, no UNet
call), read from its summary.json. match.min_generations = g is applied to the pictures the summary lists
(counted and uncounted, each with its copying generations and whether one copy is distinct): at g >= 2 =
match.low_detail_min_generations a picture counts when it is distinct and has g copying generations;
g = 1 is the summary's own count. A picture counted at g is counted at g - 1 too, so the truth's
verdict on each of the run's pictures (bench/audit_vs_truth.py true_copies: does one of its counted
generations copy it by the truth's standard) is computed once, at g = 1.

Printed per (threshold, g): each seed's recall (reproduced pictures found / reproduced) and false
alarms (reported pictures neither the pool nor the audit's own generations copy), and over the seeds
the mean recall and how many seeds met recall >= 0.95 at precision 1.0 (the issue's target).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from audit_vs_truth import score, true_copies, truth_sets  # noqa: E402
from memorization import distinct_pictures  # noqa: E402

from memex.distances import to_unit  # noqa: E402
from memex.layout import RunLayout  # noqa: E402


def counted_at(summary: dict, g: int) -> set[str]:
    """The pictures that count at match.min_generations = g (the run's other match settings)."""
    low = summary["thresholds"].get("low_detail_min_generations", 2)
    if g == 1 or g < low:
        if g != summary["thresholds"].get("min_generations", 1):
            raise ValueError(f"g={g} below low_detail_min_generations={low} needs the run's own min_generations")
        return {p["picture"] for p in summary["extracted_pictures"]}
    pictures = summary["extracted_pictures"] + summary.get("uncounted_pictures", [])
    return {p["picture"] for p in pictures if p.get("distinct", True) and p["generations"] >= g}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--model", default=str(REPO / "demo/models/demo-text"))
    ap.add_argument("--run", action="append", required=True, help="run folders (globs): audits and re-matches")
    ap.add_argument("--g", type=int, action="append", default=[], help="match.min_generations (default 1 2 3)")
    a = ap.parse_args()
    runs = sorted({p for pat in a.run for p in glob.glob(pat)})
    if not runs:
        raise SystemExit(f"no run folder matches {a.run}")
    reproduced, once, _ = truth_sets(a.truth)
    ids, _, train_u8 = distinct_pictures(a.model)
    train = to_unit(torch.from_numpy(train_u8))
    gs = a.g or [1, 2, 3]
    table: dict[tuple[float, int], dict[int, tuple]] = defaultdict(dict)
    for run in runs:
        s = json.loads(Path(run, "summary.json").read_text())
        t, seed = s["thresholds"]["match_threshold"], s["config"]["sampling"]["seed"]
        ok = true_copies(RunLayout.at(s["run"]), s, ids, train)  # per picture counted at g = 1
        for g in gs:
            found = counted_at(s, g)
            recall, _, precision, _, hit, emitted = score(found, {p: ok.get(p, False) for p in found},
                                                          set(reproduced), set(once))
            table[t, g][seed] = (recall, sorted(found - emitted), sorted(set(reproduced) - found))
    seeds = sorted({sd for row in table.values() for sd in row})
    print(f"{len(runs)} runs; truth: {len(reproduced)} reproduced pictures; seeds {seeds}")
    print(f"{'threshold':>9} {'g':>2} " + " ".join(f"{'seed ' + str(sd):>14}" for sd in seeds)
          + f" {'mean recall':>11} {'target met':>10}")
    for (t, g), row in sorted(table.items()):
        cells = [f"{row[sd][0]:.3f} ({len(row[sd][1])} FA)" if sd in row else "-" for sd in seeds]
        met = sum(r >= 0.95 and not fa for r, fa, _ in row.values())
        mean = sum(r for r, _, _ in row.values()) / len(row)
        print(f"{t:9.3f} {g:2d} " + " ".join(f"{c:>14}" for c in cells) + f" {mean:11.3f} {met:>6}/{len(row)}")
    print("missed (m) and false alarms (FA) at each setting:")
    for (t, g), row in sorted(table.items()):
        parts = [f"seed {sd}: m {','.join(row[sd][2]) or '-'}; FA {','.join(row[sd][1]) or '-'}" for sd in sorted(row)]
        print(f"  {t:.3f} g={g}: " + " | ".join(parts))


if __name__ == "__main__":
    main()
