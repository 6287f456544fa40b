"""The membership-inference report: <run>/report/mia.html, and the same section in the audit report
when the run folder holds a `memex mia` result (docs/method.md, "Membership inference").

Read from the run folder alone, what `memex mia` writes there:

    <run>/mia/summary.json      headline numbers per attack (AUC, TPR at 1% / 0.1% FPR and whether
                                the non-members resolve them, balanced accuracy, cost), by_copies
    <run>/mia/scores/           Parquet dataset, one row per image: image_id, member, caption,
                                copies, and the raw loss, pia, secmi values (lower = member)
    <run>/mia/lira.parquet      only when LiRA ran: image_id, lira_online, lira_offline (higher = member)

The table shows the summary's numbers as the stage recorded them; the ROC curves are recomputed here
from the per-image scores (memex/mia_metrics.py: member_score, roc_curve), one inline SVG with a log
FPR axis. As in memex/report.py: no JavaScript, no fetch, every id, caption and setting escaped.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memex.layout import RunLayout
from memex.mia_metrics import HIGHER_IS_MEMBER, member_score, p_text, roc_auc, roc_curve, roc_svg
from memex.redact import redact, redact_urls
from memex.report import _cards, _table, esc, page
from memex.storage import StageFolder, StorageError, Store

# where `memex mia` writes in a run folder (relative to it)
MIA_SUMMARY = "mia/summary.json"
MIA_SCORES = "mia/scores"
MIA_LIRA = "mia/lira.parquet"
MIA_PAGE = "report/mia.html"
MAX_EXPOSED = 50  # members listed in "identified with no false positive"; the rest are counted

ORDER = tuple(HIGHER_IS_MEMBER)  # loss, pia, secmi, lira_online, lira_offline: table and legend order
LIRA = ("lira_online", "lira_offline")
# (summary key of the TPR, of its resolved flag, the target FPR) per column of the headline table
AT_FPR = (("tpr_at_1pct_fpr", "resolved_1pct", 0.01), ("tpr_at_0.1pct_fpr", "resolved_0.1pct", 0.001))

CAVEAT = (
    "Read these numbers with care. The published reference points come from small CIFAR-10 DDPMs "
    "trained for many epochs (SecMI AUC about 0.88, PIA about 0.89, LiRA about 0.997). On models whose "
    "members and non-members come from the same distribution (Stable Diffusion on LAION), most of these "
    "attacks fall to chance: an AUC near 0.5 here means the attack found no signal, not that no image is "
    "memorized (the extraction audit answers that). The number to watch is the TPR at a low FPR: an "
    "attack that confidently identifies a few members is a privacy failure even at AUC 0.5, and it is "
    "only measured when there are at least 1/FPR non-members. Balanced accuracy picks its threshold on "
    "these same labels, so it is an optimistic upper bound (0.5 = chance).")


# ---- reading the run folder ----------------------------------------------------------------
def _read_scores(store: Store) -> pa.Table:
    """The per-image scores: the complete units of mia/scores/ (StageFolder markers) or, when the
    folder has no markers, every Parquet file in it (pyarrow skips `_`-prefixed names)."""
    folder = StageFolder(store, MIA_SCORES)
    if folder.complete():
        return folder.read()
    if not store.exists(folder.path):
        return pa.table({"image_id": pa.array([], pa.string()), "member": pa.array([], pa.bool_())})
    import pyarrow.dataset as ds

    return ds.dataset(folder.path, filesystem=store.fs, format="parquet").to_table()


def read_mia(store: Store) -> tuple[dict, pa.Table, pa.Table | None] | None:
    """(summary, scores, lira or None) of the run folder `store`, or None when it has no
    mia/summary.json (no membership inference was run there, or it has not finished)."""
    summary = store.read_json(store.join(MIA_SUMMARY))
    if summary is None:
        return None
    lira_path = store.join(MIA_LIRA)
    lira = store.read_table(lira_path) if store.exists(lira_path) else None
    return summary, _read_scores(store), lira


# ---- formatting ----------------------------------------------------------------------------
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if _finite(v) else '<span class="muted">n/a</span>'


def _fmt_p(v) -> str:
    """A p- or q-value (mia_metrics.p_text): never 0.000 for a positive one, as _fmt's 3 decimals printed
    the smallest p-value of 2,000 non-members or more."""
    return p_text(float(v)) if _finite(v) else '<span class="muted">n/a</span>'


def _count(v) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else esc(v if v is not None else "n/a")


def _per_image(v) -> str:
    return f"{v:,.1f}".removesuffix(".0") if _finite(v) else '<span class="muted">n/a</span>'


def _tpr_cell(m: dict, tpr_key: str, resolved_key: str, fpr: float) -> str:
    """The TPR at `fpr`, or, when fewer than 1/fpr non-members resolve it, n/a with the TPR that
    was measurable (at FPR 0: members scored above every non-member)."""
    tpr = m.get(tpr_key)
    if m.get(resolved_key, True) is False:
        at_zero = f' <span class="muted">(TPR {tpr:.3f} at FPR 0)</span>' if _finite(tpr) else ""
        return f"n/a: fewer than {round(1 / fpr):,} non-members{at_zero}"
    return _fmt(tpr)


def _attack_order(names) -> list[str]:
    names = list(names)
    return [a for a in ORDER if a in names] + sorted(a for a in names if a not in ORDER)


# ---- ROC curves from the per-image scores ----------------------------------------------------
def _floats(col) -> np.ndarray:
    """A column of any numeric (or all-null) type as float64, nulls as NaN."""
    return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), np.float64)


class Scored(NamedTuple):
    score: np.ndarray  # (n,) float64, higher = member (mia_metrics.member_score)
    member: np.ndarray  # (n,) bool
    row: np.ndarray  # (n,) int64: the row of the scores table


def attack_scores(scores: pa.Table, lira: pa.Table | None) -> dict[str, Scored]:
    """attack -> its images with a finite score and a known label, for every attack that has both
    members and non-members, in table order. LiRA's rows get their labels from the scores table by
    image_id (rows of images the scores table lacks are dropped)."""
    out: dict[str, Scored] = {}
    if "member" not in scores.column_names or not scores.num_rows:
        return out
    known = pc.is_valid(scores["member"]).to_numpy(zero_copy_only=False)
    labels = pc.fill_null(scores["member"], False).to_numpy(zero_copy_only=False).astype(bool)
    columns = {a: _floats(scores[a]) for a in ORDER if a in scores.column_names}
    if lira is not None and "image_id" in lira.column_names and "image_id" in scores.column_names:
        row_of: dict = {}
        for i, v in enumerate(scores["image_id"].to_pylist()):
            row_of.setdefault(v, i)
        at = np.array([row_of.get(v, -1) for v in lira["image_id"].to_pylist()], np.int64)
        for a in LIRA:
            if a in lira.column_names:
                vals, ok = _floats(lira[a]), at >= 0
                col = np.full(scores.num_rows, np.nan)
                col[at[ok]] = vals[ok]
                columns[a] = col
    for a in _attack_order(columns):
        raw = columns[a]
        keep = known & np.isfinite(raw)
        y = labels[keep]
        if y.any() and not y.all():
            out[a] = Scored(member_score(a, raw[keep]), y, np.flatnonzero(keep))
    return out


def roc_figure(curves: dict[str, Scored]) -> str:
    """One inline SVG of every attack's ROC (log FPR), the AUC and image counts in the legend."""
    if not curves:
        return ('<p class="muted">No ROC to draw: no attack has finite scores on both members and '
                "non-members.</p>")
    drawn = {}
    for a, c in curves.items():
        drawn[f"{a}: AUC {roc_auc(c.score, c.member):.3f}"] = roc_curve(c.score, c.member)
    counts = ", ".join(f"{esc(a)} {int(c.member.sum()):,} members / {int((~c.member).sum()):,} non-members"
                       for a, c in curves.items())
    return (f'<figure class="hist">{roc_svg(drawn, "ROC of each attack (log FPR)", width=520, height=400)}'
            f"<figcaption>True positive rate (members found) against false positive rate (non-members "
            f"flagged) as the threshold moves, from the per-image scores; FPR below 0.1% (and 0) is drawn at "
            f"the left edge; dashed: chance. Images scored: {counts}.</figcaption></figure>")


def exposed_members(scores: pa.Table, curves: dict[str, Scored]) -> str:
    """The members some attack scores above every non-member (its threshold at FPR 0): the images
    an attacker would name with no false alarm among these non-members. Ids and captions escaped."""
    found: dict[int, list[str]] = {}
    each: list[str] = []  # per attack: its count against its own chance
    for a, c in curves.items():
        top = c.score[~c.member].max()
        # a useless attack still puts a member above every non-member with probability 1 / (n0 + 1): 1,000
        # members and 256 non-members make ~3.9 such members by chance. Set against each attack's own count:
        # the union over attacks against the sum of their chances called real findings chance, the attacks
        # (loss, LiRA's two, all from the same losses) naming the same members
        chance = int(c.member.sum()) / (int((~c.member).sum()) + 1)
        hits = c.row[c.member & (c.score > top)]
        for r in hits:
            found.setdefault(int(r), []).append(a)
        versus = ("no more than chance" if len(hits) <= chance else
                  f"{len(hits) / chance:,.1f}x chance" if chance else "above chance")
        each.append(f"{esc(a)} {len(hits):,} (chance {chance:,.1f}: {versus})")
    head = "<h3>Members identified with no false positive</h3>"
    by_chance = ("By chance alone (scores that rank at random) an attack puts about members / (non-members + 1) above "
                 f"every non-member. Per attack: {'; '.join(each)}.")
    if not found:
        return (head + '<p class="muted">No attack scores any member above every non-member: at FPR 0, '
                f"no member is identified. {by_chance}</p>")
    rows = sorted(found, key=lambda r: (-len(found[r]), r))
    table = scores.take(pa.array(rows[:MAX_EXPOSED], pa.int64()))
    col = {k: table[k].to_pylist() if k in table.column_names else [None] * table.num_rows
           for k in ("image_id", "caption", "copies")}
    cells = [[f'<span class="text">{esc(i)}</span>', f'<span class="text">{esc(cap)}</span>',
              esc(cp if cp is not None else ""), esc(", ".join(found[r]))]
             for r, i, cap, cp in zip(rows, col["image_id"], col["caption"], col["copies"])]
    more = (f'<p class="muted">{len(rows) - MAX_EXPOSED:,} more: their scores are in mia/scores/ of the run '
            "folder.</p>" if len(rows) > MAX_EXPOSED else "")
    return (head + f"<p>{len(rows):,} member(s) scored above every non-member by at least one attack (the "
            f"attack's TPR at FPR 0; with few non-members FPR 0 is a coarse bound). {by_chance}</p>"
            + _table(["image", "caption", "copies", "attacks"], cells, {2}) + more)


# ---- the section -----------------------------------------------------------------------------
def _headline(attacks: dict) -> str:
    rows = []
    for a in _attack_order(attacks):
        m = attacks[a] if isinstance(attacks[a], dict) else {}
        rows.append([esc(a), _fmt(m.get("auc")), *(_tpr_cell(m, k, r, f) for k, r, f in AT_FPR),
                     _fmt(m.get("balanced_accuracy")), _per_image(m.get("unet_evaluations_per_image"))])
    if not rows:
        return '<p class="muted">The summary lists no attack.</p>'
    return _table(["attack", "AUC", "TPR at 1% FPR", "TPR at 0.1% FPR", "balanced accuracy",
                   "UNet evaluations per image"], rows, {1, 2, 3, 4, 5})


def _by_copies(by_copies: dict) -> str:
    if not by_copies:
        return ""

    def key(k: str):
        return (0, int(k), "") if str(k).lstrip("-").isdigit() else (1, 0, str(k))

    attacks = _attack_order({a for row in by_copies.values() for a in (row.get("auc") or {})})
    rows = [[esc(k), _count(row.get("members")), *(_fmt((row.get("auc") or {}).get(a)) for a in attacks)]
            for k, row in sorted(by_copies.items(), key=lambda kv: key(kv[0]))]
    return ("<h3>By copies in the training set</h3><p>AUC of the members that appear that many times in the "
            "training set against all non-members: duplicated images are the ones models memorize.</p>"
            + _table(["copies", "members", *(f"AUC {a}" for a in attacks)], rows, set(range(1, len(attacks) + 2))))


def _queries(queries: list[dict]) -> str:
    """The questioned images (queries.path): each one's p-value per attack."""
    if not queries:
        return ""
    attacks = _attack_order({a for q in queries for a in (q.get("p_value") or {})})
    # q-values (summaries of before have none): shown when several images are questioned
    q_cols = attacks if len(queries) > 1 and any(q.get("q_value") for q in queries) else []
    rows = [[esc(q.get("image_id")), *(_fmt_p((q.get("p_value") or {}).get(a)) for a in attacks),
             *(_fmt_p((q.get("q_value") or {}).get(a)) for a in q_cols)] for q in queries]
    return ("<h3>Questioned images</h3><p>Images of <code>queries.path</code>, kept out of the metrics. p-value: the "
            "share of non-members scoring at least as member-like (the image counted too). Small under an attack "
            "with a high AUC: evidence of membership; under an attack at chance: none."
            + (" q-value: Benjamini-Hochberg over the questioned images; calling members those with q &le; 0.05 "
               "makes at most ~5% of the calls wrong on average (if the questioned non-members come from the "
               "non-members' distribution), where p &le; 0.05 alone would call ~5% of any non-members."
               if q_cols else "") + "</p>"
            + _table(["image", *(f"p-value {a}" for a in attacks), *(f"q-value {a}" for a in q_cols)], rows,
                     set(range(1, len(attacks) + len(q_cols) + 1))))


def render_mia_section(summary: dict, scores: pa.Table, lira: pa.Table | None) -> str:
    """The membership-inference section as an HTML fragment (an <h2> and what follows it): the
    headline table of the attacks, their ROC curves as one inline SVG, the members some attack
    identifies at FPR 0, the by-copies table when the summary has one, the cost, and the caveat.
    Every value from the run is escaped."""
    attacks = summary.get("attacks") or {}
    out = ['<h2 id="membership-inference">Membership inference</h2>',
           "<p>Is an image in the checkpoint's training set? Each attack scores every member (an image it was "
           "trained on) and non-member (held out, ideally from the same distribution); the better the scores "
           "separate the two, the more the model gives away about its training set.</p>"]
    shadows = summary.get("shadow_models") or 0
    out.append(_cards([("members", _count(summary.get("members")), False),
                       ("non-members", _count(summary.get("nonmembers")), False),
                       *([("left out (unreadable, or a near copy of a member)", _count(summary["quarantined"]), True)]
                         if summary.get("quarantined") else []),
                       *([("LiRA shadow models", _count(shadows), False)] if shadows else []),
                       *([("UNet evaluations", _count(summary["unet_evaluations"]), False)]
                         if "unet_evaluations" in summary else [])]))
    out.append("<h3>Attacks</h3>" + _headline(attacks))
    out.append('<p class="muted">Lower loss, PIA and SecMI errors mean member; LiRA is a likelihood ratio, '
               "higher means member. AUC: the probability that a random member scores as more of a member than "
               "a random non-member (Mann-Whitney, 0.5 = chance). TPR at an FPR needs at least 1/FPR "
               "non-members to be measured.</p>")
    curves = attack_scores(scores, lira)
    out.append("<h3>ROC curves</h3>" + roc_figure(curves))
    out.append(exposed_members(scores, curves))
    out.append(_by_copies(summary.get("by_copies") or {}))
    out.append(_queries(summary.get("queries") or []))
    seconds = summary.get("seconds")
    if "unet_evaluations" in summary:
        took = f" in {seconds:,.0f} s" if _finite(seconds) else ""
        out.append(f"<p>Cost: {_count(summary['unet_evaluations'])} UNet evaluations{took}, one per image row of "
                   "every UNet forward pass (docs/method.md, section 4).</p>")
    out.append(f'<p class="note"><b>Caveat.</b> {esc(CAVEAT)}</p>')
    if summary.get("settings"):
        out.append("<details><summary>membership-inference settings (as JSON)</summary><pre>"
                   f"{esc(json.dumps(redact(summary['settings']), indent=2, sort_keys=True, default=str))}"
                   "</pre></details>")
    return "\n".join(x for x in out if x)


def render_mia_page(summary: dict, scores: pa.Table, lira: pa.Table | None) -> str:
    """The standalone page: a title line and the section, self-contained (memex.report.page)."""
    model = redact(summary.get("model") or "")
    title = f"memex membership inference: {model}"
    head = (f"<h1>{esc(title)}</h1><p class=\"muted\">run {esc(redact_urls(str(summary.get('run', ''))))} "
            f"&middot; report built {esc(dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}</p>")
    return page(title, head + "\n" + render_mia_section(summary, scores, lira))


def build_mia_report(run_uri: str, storage_options: dict | None = None) -> str:
    """(Re)build <run>/report/mia.html from the run folder alone; returns its URI."""
    store = RunLayout.at(run_uri, storage_options).store
    mia = read_mia(store)
    if mia is None:
        raise StorageError(f"{store.uri} has no {MIA_SUMMARY}: not a finished membership-inference run "
                           "(run `memex mia` to finish it, or check the path)")
    path = store.join(MIA_PAGE)
    store.write_bytes(path, render_mia_page(*mia).encode())
    return store.uri_of(path)
