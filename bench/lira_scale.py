"""LiRA on raw losses or on their logarithm, side by side on the same shadows (no training here).

    python bench/lira_scale.py runs/mia-demo-<key>      # a finished `memex mia mia=lira` folder

LiRA fits a Gaussian to each side's shadow losses. memex fitted them to the raw loss (a mean squared
error: positive, skewed right) and now fits them to its log (memex.mia.lira_statistic), chosen from
this script's numbers; Carlini et al. 2022 rescale a classifier's confidence (logit) so the Gaussian
fits better, and a log is the analogue for a positive error. This reads one finished run's
target losses (scores/) and shadow losses (shadows/), computes memex's LiRA (memex.mia.lira_online,
lira_offline, with the run's variance rule) on l and on log(l), and prints AUC, TPR at 1% FPR and the
AUC per number of copies for each. Both sides use the same shadows, noise draws and labels: only the
scale differs. Numpy only, seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memex.layout import MiaLayout  # noqa: E402
from memex.mia import lira_offline, lira_online  # noqa: E402
from memex.mia_metrics import roc_auc, tpr_at_fpr  # noqa: E402
from memex.stages.mia import lira_variance, shadow_losses  # noqa: E402


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
    member = scores["member"].to_pylist()
    known = np.array([m is not None for m in member])
    labels = np.array([bool(m) for m in member])[known]
    copies = np.array([c or 0 for c in scores["copies"].to_pylist()])[known]
    pooled = lira_variance(n_shadows) == "global"
    print(f"{run.name}: {int(labels.sum())} members, {int((~labels).sum())} non-members, {n_shadows} shadows "
          f"({lira_variance(n_shadows)} variance); loss range {target.min():.4g}-{target.max():.4g}")
    groups = sorted({int(c) for c in copies[labels] if c > 0})  # (0: copies not known)
    print(f"{'scale':<6} {'attack':<13} {'AUC':>6} {'TPR@1%':>7}  " + "  ".join(f"AUC {c} cop." for c in groups))
    for scale, f in (("raw", lambda x: x), ("log", np.log)):
        for name, fn in (("lira_online", lira_online), ("lira_offline", lira_offline)):
            s = fn(f(target), f(losses), inside, global_variance=pooled)[known]
            by = []
            for c in groups:
                keep = (~labels) | (copies == c)
                by.append(f"{roc_auc(s[keep], labels[keep]):>10.3f}")
            print(f"{scale:<6} {name:<13} {roc_auc(s, labels):>6.3f} {tpr_at_fpr(s, labels, 0.01).tpr:>7.3f}  "
                  + "  ".join(by))


if __name__ == "__main__":
    main()
