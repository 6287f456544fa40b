"""LiRA on raw losses or on their logarithm, side by side on the same shadows (no training here).

    python bench/lira_scale.py runs/mia-demo-<key>      # a finished `memex mia mia=lira` folder

LiRA fits a Gaussian to each side's shadow losses. memex fitted them to the raw loss (a mean squared
error: positive, skewed right) and now fits them to its log (memex.mia.lira_statistic), chosen from
this script's numbers; Carlini et al. 2022 rescale a classifier's confidence (logit) so the Gaussian
fits better, and a log is the analogue for a positive error. This reads one finished run's
target losses (scores/) and shadow losses (shadows/), computes memex's LiRA on log(l) (the stage's
own `lira`) and the same LiRA on l, and prints AUC, TPR at 1% FPR and the AUC per number of copies
for each, as the stage's `summarize` computes them for summary.json (scores stored as float32, as
lira.parquet holds them). Both sides use the same shadows, noise draws and labels: only the
scale differs. Numpy only, seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memex.layout import MIA_LIRA_SCHEMA, MiaLayout  # noqa: E402
from memex.mia import lira_offline, lira_online  # noqa: E402
from memex.stages.mia import lira, lira_variance, shadow_losses, summarize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="the run folder (runs/mia-...), holding mia/scores and mia/shadows")
    a = ap.parse_args()
    run = Path(a.run).resolve()
    layout = MiaLayout(str(run.parent), run.name)
    scores = layout.scores.read().sort_by("image_id")
    shadows = layout.shadows.read()
    n_shadows = len(set(shadows["shadow"].to_pylist()))
    losses, inside = shadow_losses(scores["image_id"].to_pylist(), shadows, n_shadows)  # as the stage reads them
    target = scores["loss"].to_numpy(zero_copy_only=False).astype(np.float64)
    pooled = lira_variance(n_shadows) == "global"
    # log: the stage's own lira.parquet rows; raw: the same LiRA on the loss itself. Both are scored by the
    # stage's summarize (AUC, TPR at 1% FPR, AUC by copies), as summary.json is.
    raw = pa.table({"image_id": scores["image_id"],
                    **{a: fn(target, losses, inside, global_variance=pooled).astype(np.float32)
                       for a, fn in (("lira_online", lira_online), ("lira_offline", lira_offline))},
                    "shadows_in": inside.sum(0).astype(np.int32)}, schema=MIA_LIRA_SCHEMA)
    sides = {"raw": summarize(scores, raw, []), "log": summarize(scores, lira(scores, shadows, n_shadows), [])}
    groups = list(sides["log"]["by_copies"])
    member = scores["member"].to_pylist()
    print(f"{run.name}: {member.count(True)} members, {member.count(False)} non-members, {n_shadows} shadows "
          f"({lira_variance(n_shadows)} variance); loss range {target.min():.4g}-{target.max():.4g}")
    print(f"{'scale':<6} {'attack':<13} {'AUC':>6} {'TPR@1%':>7}  " + "  ".join(f"AUC {c} cop." for c in groups))
    for scale, out in sides.items():
        for name in ("lira_online", "lira_offline"):
            m = out["attacks"][name]
            print(f"{scale:<6} {name:<13} {m['auc']:>6.3f} {m['tpr_at_1pct_fpr']:>7.3f}  "
                  + "  ".join(f"{out['by_copies'][c]['auc'][name]:>10.3f}" for c in groups))

if __name__ == "__main__":
    main()
