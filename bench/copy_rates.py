"""How often each reproduced picture is copied on fresh noises, and what a fixed budget then finds.

    python bench/audit_vs_truth.py --truth /tmp/truth-demo.parquet --strategy default --audit-seed 1 --root /tmp/s1
    ... (the same at --audit-seed 2, 3)
    python bench/copy_rates.py --truth /tmp/truth-demo.parquet --run /tmp/s1/default/demo-* --run /tmp/s2/... \
        --run /tmp/s3/...

The runs are audits of one model with one set of prompts at different run seeds (sampling.seed), so
their generations are independent draws of each prompt. For each picture the truth pool reproduces
(bench/memorization.py), a prompt's copy rate is the share of its generations the audits count as
copies of it (matches/ `extracted` rows of the picture's near-duplicate rows, summary.json), pooled
over the runs. With rate r_p per prompt, a fixed budget of n samples a prompt misses the picture
with probability prod_p (1 - r_p)^n: the script prints that per picture, and over all of them the
expected recall and the chance that one audit finds every reproduced picture, for several n.
A rate measured as 0 (no run copied it) is shown as such: more runs are needed to bound it.

--stop-when-found B: the same rates, spent another way (simulated, --trials draws): rounds of
--step samples for every prompt whose pictures are not yet all found, until B samples in all. A
prompt that copies nothing never stops, so it keeps taking its share.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from audit_vs_truth import truth_sets  # noqa: E402

UNET_PER_SAMPLE = 50 * 2  # the demo's sampling: 50 steps, guidance doubles each


def rates(runs: list[str]) -> tuple[dict[str, dict[str, tuple[int, int]]], dict[str, int]]:
    """(picture -> prompt -> (copying generations, generations) pooled over runs, prompt -> generations)."""
    copies: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    total: dict[str, int] = defaultdict(int)
    for run in runs:
        s = json.loads(Path(run, "summary.json").read_text())
        picture_of = {row: p["picture"] for p in s["extracted_pictures"] for row in p["rows"]}
        for p in s["per_prompt"]:
            total[p["prompt"]] += p["samples"]
        m = ds.dataset(str(Path(run, "matches")), format="parquet", exclude_invalid_files=True)
        seen: set[tuple[str, str]] = set()
        for r in m.to_table(columns=["sample_id", "prompt", "train_id", "extracted"]).to_pylist():
            pic = picture_of.get(r["train_id"])
            if r["extracted"] and pic is not None and (r["sample_id"], pic) not in seen:
                seen.add((r["sample_id"], pic))
                copies[pic][r["prompt"]] += 1
    return {pic: {q: (c, total[q]) for q, c in by.items()} for pic, by in copies.items()}, dict(total)


def stop_when_found(per_picture: dict, prompts: list[str], pictures: list[str], budget: int, step: int,
                    trials: int, seed: int = 0) -> tuple[float, float]:
    """(expected recall, P(every picture)) of rounds that stop a prompt once each picture it copies is found."""
    rng = np.random.default_rng(seed)
    rate = np.array([[c / g for c, g in (per_picture.get(pic, {}).get(q, (0, 1)) for pic in pictures)]
                     for q in prompts])  # (prompts, pictures)
    copies_something = rate.sum(axis=1) > 0
    found_total, every = 0, 0
    for _ in range(trials):
        found = np.zeros(len(pictures), bool)
        active, spent = np.ones(len(prompts), bool), 0
        while spent < budget and active.any():
            for q in np.flatnonzero(active):
                n = min(step, budget - spent)
                if n <= 0:
                    break
                spent += n
                found |= (rng.random((n, len(pictures))) < rate[q]).any(axis=0)
            # a prompt stops once every picture it is seen to copy is found; one that copies nothing never
            active &= ~copies_something | ~np.all(found | (rate == 0), axis=1)
        found_total += found.sum()
        every += found.all()
    return found_total / (trials * max(len(pictures), 1)), every / trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--run", action="append", required=True, help="an audit's run folder (glob); give several seeds")
    ap.add_argument("--n", type=int, action="append", default=[], help="samples a prompt (default 8 16 32 64)")
    ap.add_argument("--stop-when-found", type=int, default=None, metavar="B", help="simulate that rule at B samples")
    ap.add_argument("--step", type=int, default=8)
    ap.add_argument("--trials", type=int, default=2000)
    a = ap.parse_args()
    runs = sorted({p for pat in a.run for p in glob.glob(pat)})
    if not runs:
        raise SystemExit(f"no run folder matches {a.run}")
    reproduced, _, _ = truth_sets(a.truth)
    per_picture, total = rates(runs)
    ns = a.n or [8, 16, 32, 64]
    print(f"{len(runs)} runs, {len(total)} prompts, {sum(total.values())} generations; "
          f"{len(reproduced)} pictures reproduced in the truth pool")
    print(f"{'picture':<12} {'copying prompts: copies/generations':<48} " + " ".join(f"miss@{n:<3}" for n in ns))
    miss = {n: [] for n in ns}
    for pic in sorted(reproduced):
        by = per_picture.get(pic, {})
        for n in ns:
            p = 1.0
            for c, g in by.values():
                p *= (1 - c / g) ** n
            miss[n].append(p)
        what = ", ".join(f"{c}/{g}" for c, g in sorted(by.values(), reverse=True)) or "never copied in these runs"
        print(f"{pic:<12} {what[:48]:<48} " + " ".join(f"{miss[n][-1]:7.3f}" for n in ns))
    k = len(reproduced)
    for n in ns:
        every = 1.0
        for p in miss[n]:
            every *= 1 - p
        print(f"n={n:<3} {len(total)} prompts x {n} = {len(total) * n * UNET_PER_SAMPLE:>9,} UNet evaluations: "
              f"expected recall {1 - sum(miss[n]) / max(k, 1):.3f}, P(every reproduced picture) {every:.3f}")
    if a.stop_when_found:
        b = a.stop_when_found
        r, e = stop_when_found(per_picture, sorted(total), sorted(reproduced), b, a.step, a.trials)
        print(f"stop when found, rounds of {a.step}, {b} samples = {b * UNET_PER_SAMPLE:>9,} UNet evaluations: "
              f"expected recall {r:.3f}, P(every reproduced picture) {e:.3f} ({a.trials} simulated audits)")


if __name__ == "__main__":
    main()
