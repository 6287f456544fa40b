"""How well a membership-inference score separates members from non-members: ROC, AUC, TPR at a
low FPR, balanced accuracy, and the ROC picture (docs/method.md, "Membership inference"; the
attacks themselves are memex/mia.py). Plain numpy, no model.

Convention: every function here takes scores where HIGHER = member and labels where True = member.
The loss-type attacks (loss, pia, secmi: an error, lower = member) are negated first, in one
place: `member_score(attack, raw)`. LiRA's scores are already log-likelihood ratios (higher = member).

Why TPR at a low FPR and not only AUC (Carlini et al., "Membership inference attacks from first
principles", 2022): an attack that confidently identifies a few members is a privacy failure even
at AUC ~0.5. Its resolution is 1 / (number of non-members): with 500 non-members "TPR at 0.1%
FPR" can only be read at FPR 0, and `tpr_at_fpr` says so (`resolved=False`) rather than
interpolating a value it did not measure.
"""

from __future__ import annotations

from typing import NamedTuple
from xml.sax.saxutils import escape

import numpy as np

# attack -> whether its raw score is already "higher = member"; the one table of orientations
HIGHER_IS_MEMBER = {"loss": False, "pia": False, "secmi": False, "lira_online": True, "lira_offline": True}


def member_score(attack: str, raw: np.ndarray) -> np.ndarray:
    """(N,) raw scores of `attack` -> (N,) float64 scores where higher = member (errors negated)."""
    if attack not in HIGHER_IS_MEMBER:
        raise ValueError(f"unknown attack {attack!r}; valid: {', '.join(HIGHER_IS_MEMBER)}")
    raw = np.asarray(raw, np.float64)
    return raw if HIGHER_IS_MEMBER[attack] else -raw


def bh_q_values(p) -> np.ndarray:
    """(M,) Benjamini-Hochberg q-values of M p-values: the smallest false-discovery rate at which
    each would be called. q_(i) = min over j >= i of p_(j) M / j (p sorted ascending), capped at
    1. It holds for independent or positively dependent p-values; the queries' share one set of
    non-members, which makes them positively dependent."""
    p = np.asarray(p, np.float64)
    if p.ndim != 1 or np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"bh_q_values takes (M,) p-values in [0, 1], got {p!r}")
    m = len(p)
    if not m:
        return p.copy()
    order = np.argsort(p, kind="stable")
    q = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]  # monotone: min over the larger p-values
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def p_text(v: float) -> str:
    """A p- or q-value for a table or the console: 3 decimals from 0.01 up (0.500, as it always read), 3
    significant figures below, so a positive value never reads 0 (with 30,000 non-members the smallest
    p-value, 1/30,001 = 3.33e-05, printed as 0.000: "no chance at all", where docs/method.md says at
    least 1/(n0+1))."""
    return f"{v:.3f}" if v >= 0.01 or v == 0 else f"{v:.3g}"


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) must have the same length")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be boolean (True = member) or 0/1")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite values")
    if y.all() or not y.any():
        raise ValueError(f"labels need both members and non-members (got {int(y.sum())} members of {y.size})")
    return s, y


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), each (K+1,) float64 from (0, 0) to (1, 1), one point per distinct score
    (thresholds "score >= s", highest first). Tied scores enter together: a tie of a member and a
    non-member is one diagonal segment, never an optimistic or pessimistic step."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve = the Mann-Whitney statistic P(member > non-member) with ties
    counted 1/2: (rank sum of members - n1(n1+1)/2) / (n1 n0), average ranks for ties. O(n log n)."""
    s, y = _check(scores, labels)
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size)
    sorted_s = s[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]  # start of each run of equal scores
    stop = np.r_[first[1:], s.size]
    avg = (first + stop + 1) / 2.0  # average 1-based rank of each run
    ranks[order] = np.repeat(avg, stop - first)
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


class AtFpr(NamedTuple):
    tpr: float  # the largest TPR of a threshold whose FPR <= the target
    fpr: float  # that threshold's FPR (<= target; 0 when unresolved)
    resolved: bool  # False: fewer than 1/target non-members, so only FPR 0 was measurable
    negatives: int  # non-members: the FPR resolution is 1/negatives


def tpr_at_fpr(scores, labels, fpr: float) -> AtFpr:
    """TPR at a target FPR (e.g. 0.01, 0.001): the largest TPR among thresholds with FPR <= fpr.
    With fewer than 1/fpr non-members the only such threshold is FPR 0: the value is still
    returned (the members scored above every non-member), flagged resolved=False."""
    if not 0 < fpr <= 1:
        raise ValueError(f"target fpr must be in (0, 1], got {fpr}")
    f, t = roc_curve(scores, labels)
    ok = f <= fpr + 1e-12  # float slack: 10/1000 must count as 0.01
    i = int(np.flatnonzero(ok)[np.argmax(t[ok])])
    n0 = int((~_check(scores, labels)[1]).sum())
    return AtFpr(float(t[i]), float(f[i]), n0 * fpr >= 1, n0)


def balanced_accuracy(scores, labels) -> float:
    """max over thresholds of (TPR + TNR) / 2. The threshold is chosen on these labels, so this is
    an optimistic upper bound (0.5 = chance), not the accuracy of a threshold fixed in advance."""
    f, t = roc_curve(scores, labels)
    return float(np.max((t + 1 - f) / 2))


# ---- the picture ---------------------------------------------------------------------------
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
FPR_MIN = 1e-3  # left edge of the log FPR axis; FPR below it (incl. 0) is drawn at the edge


def roc_svg(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC (log FPR)",
            width: int = 420, height: int = 360) -> str:
    """A self-contained inline SVG (no JS, no external CSS): log-scale FPR axis 1e-3..1, linear TPR
    axis 0..1, the chance diagonal (dashed path), one <polyline> per curve in dict order, a legend
    and labelled axes. Curve names are escaped; put the AUC in the name if the legend should show it."""
    left, right, top, bottom = 48, 12, 28, 42
    pw, ph = width - left - right, height - top - bottom
    decades = -np.log10(FPR_MIN)

    def xy(fpr, tpr) -> tuple[np.ndarray, np.ndarray]:
        lx = np.log10(np.clip(np.asarray(fpr, float), FPR_MIN, 1.0))
        return left + (lx / decades + 1) * pw, top + (1 - np.clip(np.asarray(tpr, float), 0, 1)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="white" stroke="#888"/>',
           f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for k in range(int(decades) + 1):  # FPR ticks: 0.1%, 1%, 10%, 100%
        v = FPR_MIN * 10**k
        x = xy([v], [0])[0][0]
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">{v * 100:g}%</text>')
    for v in (0, 0.25, 0.5, 0.75, 1):
        y = xy([1], [v])[1][0]
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">'
               'false positive rate (non-members flagged, log scale)</text>')
    out.append(f'<text transform="translate(13 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
               'true positive rate (members found)</text>')
    g = np.logspace(-decades, 0, 61)  # TPR = FPR is a curve on a log axis
    cx, cy = xy(g, g)
    out.append('<path d="M' + " L".join(f"{a:.1f},{b:.1f}" for a, b in zip(cx, cy))
               + '" fill="none" stroke="#999" stroke-dasharray="4 3"/>')
    for i, (name, (fpr, tpr)) in enumerate(curves.items()):
        x, y = xy(fpr, tpr)
        pts = np.round(np.stack([x, y], 1), 1)
        keep = np.r_[True, np.any(np.diff(pts, axis=0) != 0, axis=1)]  # drop repeats: 1e5-point ROCs shrink
        color = COLORS[i % len(COLORS)]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="'
                   + " ".join(f"{a:g},{b:g}" for a, b in pts[keep]) + '"/>')
        # legend: bottom right inside the plot, below the chance line, where better-than-chance curves never go
        lx, ly = left + pw * 0.6, top + ph - 8 - 14 * (len(curves) - 1 - i)
        out.append(f'<line x1="{lx:.1f}" y1="{ly - 4:.1f}" x2="{lx + 16:.1f}" y2="{ly - 4:.1f}" stroke="{color}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{lx + 20:.1f}" y="{ly:.1f}">{escape(str(name))}</text>')
    out.append("</svg>")
    return "\n".join(out)
