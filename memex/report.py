"""Static HTML reports: one per audit (run/report/index.html) and the nightly trend page.

A report is one self-contained file: images are embedded as data: URIs (thumbnails of at most
THUMB px, so a 512 px Stable Diffusion pair costs ~100 kB, not ~800 kB), charts are inline SVG
drawn here, and there is no JavaScript at all. A Content-Security-Policy meta tag forbids scripts
and every fetch, so the page makes no network request. Prompts, captions, ids and config values
come from scraped data or users: every one goes through `esc` (html.escape), never into markup raw.

Built from the run folder alone (`memex report RUN`): summary.json, candidates/, matches/,
matched_train_images.parquet and the samples of the extracted generations (memex/layout.py).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import posixpath
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memex.images import thumbnail_png
from memex.layout import CANDIDATES_SCHEMA, MATCHED_TRAIN_SCHEMA, MATCHES_SCHEMA, RunLayout, StorageError
from memex.ledger import ALARMS
from memex.redact import redact, redact_urls

THUMB = 256  # px: larger images are downscaled before embedding
MAX_PAIRS = 200  # extracted pairs shown; the rest are counted (their rows are in matches/)
# rows a table shows; the rest are counted: with match.candidates=all a large audit's uncounted pictures
# run to tens of thousands, all in summary.json (and the prompts in candidates/)
MAX_ROWS = 500
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde}
.muted{color:#667}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #dde;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:22px}.alarm b{color:#b3261e}
table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #eef;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f6f7fb}.num{text-align:right;font-variant-numeric:tabular-nums}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.pair{border:1px solid #dde;border-radius:6px;padding:8px}.pair img{width:128px;height:128px;image-rendering:pixelated;
object-fit:contain;background:#eee}.imgs{display:flex;gap:8px}.imgs figure{margin:0}
.imgs figcaption{font-size:11px;color:#667}
.text{overflow-wrap:anywhere}pre{background:#f6f7fb;padding:10px;overflow:auto;font-size:12px}
svg text{font:11px system-ui,sans-serif;fill:#445}.hists{display:flex;flex-wrap:wrap;gap:16px}
.hist{margin:0;max-width:520px}.hist figcaption{font-size:12px;color:#556}summary{cursor:pointer}
"""


def esc(value) -> str:
    """Any value as HTML text: `<script>` in a caption is shown, never run."""
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def data_uri(png: bytes) -> str:
    """A PNG as a data: URI, downscaled to THUMB px on its long side when larger."""
    return "data:image/png;base64," + base64.b64encode(thumbnail_png(png, THUMB)).decode()


def _extracted(p: dict) -> int:
    """A prompt's generations that copy a *counted* picture (summary.json per_prompt counted_samples;
    a summary from before it: every generation within the threshold, extracted_samples)."""
    return p.get("counted_samples", p.get("extracted_samples", 0))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ---- SVG charts ------------------------------------------------------------------------------
def histogram_svg(values: Sequence[float], threshold: float | None, label: str, bins: int = 30,
                  width: int = 520, height: int = 180, x_max: float | None = None) -> str:
    """Bars of `values` with a red line at `threshold` (none when it is None); values are >= 0.

    `x_max`: the right end of the x axis (default: the largest value or threshold, plus 5%), so that
    two histograms can share one scale."""
    # numpy, not a Python loop: at the paper's scale a histogram is of 175M generations' distances (float32,
    # 700 MB), counted HIST_CHUNK values at a time: a float64 copy of them all and its temporaries were ~24 bytes a
    # value more, 3.9 GB in the driver (bench/bench_match_memory.py)
    vals = values if isinstance(values, np.ndarray) else np.asarray(list(values), dtype=np.float64)
    vals = vals.reshape(-1)
    n, top_value = 0, -np.inf
    for part in _finite_parts(vals):
        n += part.size
        top_value = max(top_value, float(part.max())) if part.size else top_value
        del part  # (not held while the next one is made)
    if not n:
        return f'<p class="muted">no {esc(label)} to plot</p>'
    hi = x_max if _finite(x_max) and x_max > 0 else max(top_value, threshold or 0.0) * 1.05 or 1.0
    total = np.zeros(bins, np.int64)
    for part in _finite_parts(vals):
        part /= hi  # in place, in the order (v / hi) * bins: the same bins as the whole array's
        part *= bins
        idx = part.astype(np.int64)
        np.minimum(idx, bins - 1, out=idx)
        total += np.bincount(idx, minlength=bins)
        del part, idx
    return histogram_drawn(total.tolist(), hi, n, threshold, label, width, height)


def histogram_drawn(counts: list[int], hi: float, n: int, threshold: float | None, label: str, width: int = 520,
                    height: int = 180) -> str:
    """The SVG figure of histogram_svg's `counts` (equal bins over [0, hi]) of `n` values."""
    bins = len(counts)
    top, pad, plot_w, plot_h = max(counts), 30, width - 55, height - 30
    bar_w = plot_w / bins
    parts = [f'<svg role="img" aria-label="{esc(label)}" width="{width}" height="{height}" '
             f'xmlns="http://www.w3.org/2000/svg">']
    for i, c in enumerate(counts):
        h = plot_h * c / top
        parts.append(f'<rect x="{pad + i * bar_w:.1f}" y="{10 + plot_h - h:.1f}" width="{bar_w - 1:.1f}" '
                     f'height="{h:.1f}" fill="#6b8fd6"><title>{c}</title></rect>')
    if threshold is not None:
        tx = pad + plot_w * threshold / hi
        parts.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="6" y2="{10 + plot_h}" stroke="#d93025" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{tx + 4:.1f}" y="16" style="fill:#d93025">threshold {threshold:g}</text>')
    parts.append(f'<line x1="{pad}" x2="{pad + plot_w}" y1="{10 + plot_h}" y2="{10 + plot_h}" stroke="#889"/>')
    for f in (0, 0.5, 1):
        parts.append(f'<text x="{pad + plot_w * f:.1f}" y="{height - 5}" text-anchor="middle">{hi * f:.3g}</text>')
    parts.append("</svg>")
    return (f'<figure class="hist">{"".join(parts)}<figcaption>{esc(label)} (n = {n}, tallest bar {top})'
            f"</figcaption></figure>")


HIST_CHUNK = 1 << 21  # values histogram_svg converts at a time: ~17 bytes each held while one is counted, ~35 MB


def _finite_parts(vals: np.ndarray):
    """The finite values of a 1-D array, HIST_CHUNK at a time, each a float64 copy of its own (to change in place)."""
    for start in range(0, vals.size, HIST_CHUNK):
        part = vals[start:start + HIST_CHUNK].astype(np.float64)
        part = part[np.isfinite(part)]  # (rebound: the unfiltered copy is not held while the caller counts)
        yield part


def line_chart_svg(xs: Sequence[float], series: dict[str, Sequence[float]], xlabel: str,
                   width: int = 640, height: int = 240) -> str:
    """One polyline per series over shared x values (training steps)."""
    colors = ["#d93025", "#1a73e8", "#188038", "#e37400"]
    if not xs:
        return '<p class="muted">nothing audited yet</p>'
    x0, x1 = min(xs), max(xs)
    ymax = max([max(v) for v in series.values() if len(v)] + [1])
    pad_l, pad_b, plot_w, plot_h = 40, 40, width - 60, height - 60

    def sx(x: float) -> float:
        return pad_l + plot_w * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def sy(y: float) -> float:
        return 10 + plot_h * (1 - y / ymax)

    parts = [f'<svg role="img" aria-label="trend" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{pad_l}" x2="{pad_l + plot_w}" y1="{10 + plot_h}" y2="{10 + plot_h}" stroke="#889"/>',
             f'<line x1="{pad_l}" x2="{pad_l}" y1="10" y2="{10 + plot_h}" stroke="#889"/>',
             f'<text x="{pad_l - 6}" y="14" text-anchor="end">{ymax:g}</text>',
             f'<text x="{pad_l - 6}" y="{10 + plot_h}" text-anchor="end">0</text>']
    for x in sorted(set(xs)):
        parts.append(f'<text x="{sx(x):.1f}" y="{height - pad_b + 14}" text-anchor="middle">{x:g}</text>')
    for k, (name, ys) in enumerate(series.items()):
        c = colors[k % len(colors)]
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{c}"><title>{esc(name)} at {x:g}: {y:g}'
                  f"</title></circle>" for x, y in zip(xs, ys)]
        parts.append(f'<text x="{pad_l + 8 + 170 * k}" y="{height - 6}" style="fill:{c}">&#9632; {esc(name)}</text>')
    parts.append(f'<text x="{pad_l + plot_w}" y="{height - 6}" text-anchor="end">{esc(xlabel)}</text></svg>')
    return "".join(parts)


def _cards(items: Iterable[tuple[str, object, bool]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card{" alarm" if alarm else ""}"><b>{esc(v)}</b>{esc(k)}</div>'
        for k, v, alarm in items) + "</div>"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: set[int] = frozenset()) -> str:
    """Cells are already HTML (escape text with esc before passing it)."""
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{esc(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---- the audit report ----------------------------------------------------------------------
def _count(n) -> str:
    """An int with thousands separators (12,345); anything else as text."""
    return f"{n:,}" if isinstance(n, int) else esc(n)


def _detail(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else ""


def _cost(summary: dict) -> str:
    """What the UNet evaluations count and, for an adaptive budget, the rounds that spent them."""
    if "unet_evaluations" not in summary:
        return ""
    out = [f'<p>Cost: {_count(summary["unet_evaluations"])} UNet evaluations, one per batch row of every UNet '
           f"forward pass (classifier-free guidance counts 2 per row): triage "
           f'{_count(summary.get("unet_evaluations_triage", 0))}, padding (batch rows filled past the last sample) '
           f'{_count(summary.get("unet_evaluations_padding", 0))} included.']
    if summary.get("samples_made_on"):
        out.append(f' Samples made on {esc("; ".join(summary["samples_made_on"]))}.')
    budget = summary.get("budget") or {}
    if "prompts_sampled" in summary:
        out.append(f' {_count(summary["prompts_sampled"])} of {_count(summary["prompts"])} prompts sampled.')
    if summary.get("candidates"):
        which = {"cliques": "the generations in flagged cliques", "all": "every generation"}
        verified = which.get(summary["candidates"], summary["candidates"])
        out.append(f" Verified against the training set: {esc(verified)}.")
    out.append("</p>")
    if budget.get("kind") == "adaptive":
        rounds = "".join(f'<li>round {r}: {_count(rd.get("prompts"))} prompts x samples '
                         f'[{esc(rd["samples"][0])}, {esc(rd["samples"][1])})</li>' if rd.get("prompts") != 0 else
                         f'<li>round {r}: no prompt showed a sign of memorization; the budget stopped at '
                         f'{esc(rd["samples"][0])} samples</li>'
                         for r, rd in enumerate(budget.get("rounds", [])))
        out.append(f"<p>Adaptive budget, sampled in rounds:</p><ul>{rounds}</ul>")
    return "".join(out)


def _preview_triage(summary: dict) -> str:
    """triage=preview: per prompt, the tiled l2 of its closest short-schedule preview to the training
    set, for prompts with and without an extracted generation, and the 10 closest."""
    scored = [p for p in summary["per_prompt"] if _finite(p.get("triage_distance"))]
    t = summary.get("thresholds", {})
    # previews are matched by tiled l2; a re-match of their run by relative l2 (run.samples_from
    # match=relative) has a threshold on another scale: no line for it on this axis
    thr = t.get("match_threshold") if t.get("match_distance", "tiled_l2") == "tiled_l2" else None
    hit = [p["triage_distance"] for p in scored if _extracted(p) > 0]
    rest = [p["triage_distance"] for p in scored if _extracted(p) <= 0]
    x_max = max(max(p["triage_distance"] for p in scored), thr or 0.0) * 1.05 or None
    out = ['<h2>Triage</h2><p>Previews matched to the training set: per prompt, the tiled l2 of its closest '
           'short-schedule preview to its nearest training image. A memorizing prompt&#39;s previews already land '
           'near the picture it copies (red: the match threshold).</p>',
           '<div class="hists">'
           + histogram_svg(hit, thr, "closest preview of prompts with an extracted generation", x_max=x_max)
           + histogram_svg(rest, thr, "closest preview of the other prompts", x_max=x_max) + "</div>"]
    top = sorted(scored, key=lambda p: (p["triage_distance"], p.get("prompt_id", "")))[:10]
    out.append(f"<p>The {len(top)} prompts whose previews came closest:</p>")
    out.append(_table(["prompt", "closest preview (tiled l2)", "samples", "extracted"],
                      [[f'<span class="text">{esc(p.get("prompt"))}</span>', f'{p["triage_distance"]:.4g}',
                        esc(p.get("samples", "")), esc(_extracted(p))] for p in top], {1, 2, 3}))
    return "".join(out)


def _triage(summary: dict) -> str:
    """Triage scores (Wen et al.) of prompts with and without an extracted generation, and the top 10;
    triage=preview: their previews' distances to the training set instead."""
    if any(p.get("triage_distance") is not None for p in summary.get("per_prompt", [])):
        return _preview_triage(summary)
    # finite scores only: a NaN (fp16 UNet outputs) won max() and failed the histogram, and the audit with it
    scored = [p for p in summary.get("per_prompt", []) if _finite(p.get("triage_score"))]
    if not scored:
        return ""
    hit = [p["triage_score"] for p in scored if _extracted(p) > 0]
    rest = [p["triage_score"] for p in scored if _extracted(p) <= 0]
    x_max = max(p["triage_score"] for p in scored) * 1.05 or None  # one x scale for both histograms
    out = ['<h2>Triage</h2><p>Memorization score per prompt (Wen et al.): the RMS of eps(x_t, prompt) &minus; '
           'eps(x_t, "") over the first sampling step. Memorized prompts tend to score high.</p>',
           '<div class="hists">'
           + histogram_svg(hit, None, "triage score of prompts with an extracted generation", x_max=x_max)
           + histogram_svg(rest, None, "triage score of the other prompts", x_max=x_max) + "</div>"]
    top = sorted(scored, key=lambda p: (-p["triage_score"], p.get("prompt_id", "")))[:10]
    out.append(f"<p>Top {len(top)} prompts by triage score:</p>")
    out.append(_table(["prompt", "triage score", "samples", "extracted"],
                      [[f'<span class="text">{esc(p.get("prompt"))}</span>', f'{p["triage_score"]:.4g}',
                        esc(p.get("samples", "")), esc(_extracted(p))] for p in top], {1, 2, 3}))
    return "".join(out)


def _picture_cells(p: dict) -> list[str]:
    rows = p.get("rows", [])
    return [esc(p["picture"]), esc(p.get("generations")), esc(p.get("in_clique", "")), _detail(p.get("detail")),
            "yes" if p.get("low_complexity") else "", _detail(p.get("margin")),
            f'{len(rows)}: <span class="text">{esc(", ".join(rows[:20]))}{" ..." if len(rows) > 20 else ""}</span>']


PICTURE_HEADER = ["picture", "copying generations", "in a clique", "tile detail", "low complexity",
                  "margin (to the next picture)", "rows in the training set"]


def _pictures(summary: dict) -> str:
    """Extracted pictures (a picture stored as several rows, LAION duplicates, counts once) and the
    pictures within the threshold that do not count."""
    t, out = summary["thresholds"], []
    pictures = summary.get("extracted_pictures", [])
    if pictures:
        out.append(f"<h2>Extracted training pictures ({len(pictures)})</h2>")
        out.append(_table(PICTURE_HEADER, [_picture_cells(p) for p in pictures[:MAX_ROWS]], {1, 2, 3, 5}))
        out.append(_more(len(pictures), "extracted_pictures in summary.json"))
    uncounted = summary.get("uncounted_pictures", [])
    if uncounted:
        out.append(f"<h2>Not counted ({len(uncounted)})</h2><p>Some generation came within the threshold of these "
                   "training pictures, but they do not count as extracted.</p>")
        out.append(_table(PICTURE_HEADER[:-1] + ["reason", PICTURE_HEADER[-1]],
                          [(c := _picture_cells(p))[:-1] + [esc(uncounted_reason(p, t)), c[-1]]
                           for p in uncounted[:MAX_ROWS]], {1, 2, 3, 5}))
        out.append(_more(len(uncounted), "uncounted_pictures in summary.json"))
    return "\n".join(out)


def _more(n: int, where: str) -> str:
    """The line under a table cut at MAX_ROWS: how many rows it left out and where they are."""
    return f'<p class="muted">{n - MAX_ROWS:,} more in {esc(where)}.</p>' if n > MAX_ROWS else ""


def uncounted_reason(p: dict, t: dict) -> str:
    """Why a picture some generation came within the threshold of is not counted (match.py count_pictures),
    in the order its rules apply: the distinct-copy test first, then the generations it needs."""
    g = p.get("generations")
    if not p.get("distinct", True):
        return (f'not distinct: its closest copy is {p["margin"]:.2f} of the way to the next training '
                f'picture; needs {t.get("max_margin")}')
    if g is not None and g < (t.get("min_generations") or 0):  # every picture needs these, clique or not
        return f'{g} copying generation(s); needs {t.get("min_generations")}'
    if p.get("low_complexity"):  # it needs both counts (count_pictures: max of the two)
        need = max(t.get("low_detail_min_generations") or 0, t.get("min_generations") or 0)
        return (f"low complexity: {g} copying generation(s), none in a flagged clique or closer than "
                f"its tile mosaic; needs {need}")
    return f'{g} copying generation(s); needs {t.get("min_generations")}'


def render_report(summary: dict, candidates: pa.Table, matches: pa.Table, sample_png: dict[str, bytes],
                  train_png: dict[int, bytes], mia_section: str = "", distances: np.ndarray | None = None) -> str:
    """The report of one audit as an HTML string (inputs: what `build_report` reads from the run).
    `mia_section`: the membership-inference section (memex/mia_report.py), placed before the config.
    `distances`: every verified candidate's distance, for its histogram (default: matches'; build_report
    passes only the extracted rows as `matches`)."""
    # redacted again here: a summary.json written before memex/redact.py may still hold credentials
    t, cfg = summary["thresholds"], redact(summary.get("config", {}))
    model = redact(summary["model"])
    unet = (cfg.get("model") or {}).get("unet")
    title = f"memex audit: {model['name']}"
    out = [f"<h1>{esc(title)}</h1>",
           f'<p class="muted">model {esc(model["path"])}{" + UNet " + esc(unet) if unet else ""} &middot; run '
           f'{esc(redact_urls(summary["run"]))} &middot; report built '
           f'{esc(dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))}</p>']
    if summary.get("samples_from"):  # a re-match (memex/stages/rematch.py): whose generations these are
        out.append(f'<p class="muted">A re-match of the generations of run {esc(redact_urls(summary["samples_from"]))}'
                   " with this page's filter and match settings: no generation was made for it, and its UNet "
                   "evaluations are what that run spent on them.</p>")
    n_ext = summary["extracted_unique_train_images"]
    counted_gens = summary.get("counted_generations",  # a summary.json from before the key: its per_prompt
                               sum(_extracted(p) for p in summary.get("per_prompt", [])))
    per_image = summary.get("unet_evaluations_per_extracted_image")
    out.append(_cards([
        ("training images extracted", n_ext, n_ext > 0),
        # the alarm is a generation that copies a counted picture; one within the threshold of a low-complexity
        # or once-met look-alike only is shown beside it, not as an alarm (a clean audit read "7" in red)
        ("generations copying them", counted_gens, counted_gens > 0),
        ("generations within the threshold", summary["extracted_generations"], False),
        (f"prompts flagged of {summary['prompts']}", summary["prompts_flagged"], False),
        ("samples generated", summary["samples"], False),
        ("candidates verified", summary["candidates_verified"], False),
        *([("prompts undecided", summary["prompts_undecided"], True)] if summary.get("prompts_undecided") else []),
        *([("UNet evaluations", f'{summary["unet_evaluations"]:,}', False)] if "unet_evaluations" in summary else []),
        *([("UNet evaluations per extracted image", f"{per_image:,}", False)] if per_image is not None else []),
    ]))
    # what ran: the filter is skipped for an unconditional model's one prompt; relative l2 compares with the
    # mean distance to the nearest distinct pictures, not the match.k nearest rows
    ran = summary.get("filter", "ran") == "ran"
    filt = (f'Filter: a prompt is flagged when {t["min_clique"]} of its generations form a clique at tiled l2 '
            f'&le; {t["filter_edge_tiled_l2"]}. ' if ran else f'Filter: {esc(summary.get("filter"))}. ')
    near = ("relative to its mean distance to the nearest distinct training pictures"
            if t["match_distance"] == "relative_l2" else f'of its {t["match_k"]} nearest in the index')
    out.append(f'<p>{filt}Match: a candidate is a copy when its {esc(t["match_distance"])} to a training image '
               f'({near}) is &le; {t["match_threshold"]}.</p>')
    out.append(_cost(summary))

    counted = set(summary.get("extracted_train_ids", []))
    ext = extracted_in_order(matches, counted)
    why = {i: uncounted_reason(p, t) for p in summary.get("uncounted_pictures", []) for i in p.get("rows", [])}
    n_counted = int(pc.sum(pc.is_in(ext["train_id"], pa.array(sorted(counted), pa.string()))).as_py() or 0) \
        if ext.num_rows else 0
    out.append(f"<h2>Extracted generations ({ext.num_rows}: {n_counted} of counted pictures)</h2>")
    if not ext.num_rows:
        out.append('<p class="muted">No generation was verified as a copy of a training image.</p>')
    elif n_counted < ext.num_rows:
        out.append('<p class="muted">Generations within the threshold of a training picture; those of pictures that '
                   "count as extracted come first, then those of pictures that do not count (low complexity, too few "
                   "copying generations, or not distinct), each marked with its reason.</p>")
    def img(png: bytes | None, alt: str) -> str:
        return (f'<img alt="{esc(alt)}" src="{data_uri(png)}">' if png
                else f'<span class="muted">{esc(alt)} not stored</span>')

    cards = []
    for r in ext.slice(0, MAX_PAIRS).to_pylist():
        gen, tr = sample_png.get(r["sample_id"]), train_png.get(r["train_gid"])
        detail = _detail(r.get("train_detail"))
        cards.append(
            f'<div class="pair"><div class="imgs"><figure>{img(gen, "generation " + r["sample_id"])}'
            f'<figcaption>generation {esc(r["sample_id"])}</figcaption></figure><figure>'
            f'{img(tr, "training image " + str(r["train_id"]))}<figcaption>training {esc(r["train_id"])}</figcaption>'
            f'</figure></div><div><b>{esc(t["match_distance"])} {r["distance"]:.4f}</b></div>'
            + (f'<div class="muted">training tile detail {detail}</div>' if detail else "")
            + (f'<div class="muted"><b>not counted</b>: {esc(why.get(r["train_id"], "its picture does not count"))}'
               "</div>" if r["train_id"] not in counted else "")
            + f'<div class="text">prompt: {esc(r["prompt"])}</div>'
            f'<div class="text muted">caption: {esc(r["train_caption"])}</div></div>')
    if cards:
        out.append('<div class="pairs">' + "".join(cards) + "</div>")
    if ext.num_rows > MAX_PAIRS:
        out.append(f'<p class="muted">{ext.num_rows - MAX_PAIRS} more in matches/ of the run folder.</p>')

    # flagged prompts with clique sizes
    flagged = candidates.filter(candidates["flagged"]).sort_by(
        [("clique_size", "descending"), ("prompt_id", "ascending")]) if candidates.num_rows else candidates
    per = {p["prompt_id"]: p for p in summary.get("per_prompt", [])}
    if not ran:  # no clique was searched: nothing to list (it said "No prompt reached the clique size")
        flagged, candidates = candidates.slice(0, 0), candidates.slice(0, 0)
    out.append(f"<h2>Flagged prompts ({flagged.num_rows} of {candidates.num_rows})</h2>")
    rows = []
    for c in flagged.slice(0, MAX_ROWS).to_pylist():
        p = per.get(c["prompt_id"], {})
        bound = "" if c["clique_exact"] else f' (&le; {c["clique_upper_bound"]})'
        rows.append([f'<span class="text">{esc(c["prompt"])}</span>', f'{c["clique_size"]}{bound}', esc(c["n_samples"]),
                     esc(_extracted(p)), esc(", ".join(p.get("counted_train_ids", p.get("train_ids", []))))])
    out.append(_table(["prompt", "clique size", "samples", "extracted", "training images"], rows, {1, 2, 3})
               if rows else '<p class="muted">' + ("No prompt reached the clique size." if ran
                                                    else "The filter did not run.") + "</p>")
    out.append(_more(flagged.num_rows, "candidates/ of the run folder (flagged rows)"))
    undecided = set(summary.get("undecided_prompt_ids", []))
    if undecided:
        out.append(f'<h2>Undecided prompts ({len(undecided)})</h2><p>The clique search ran out of '
                   "filter.max_expansions before it could rule out a clique of the minimum size: these prompts "
                   "are neither flagged nor cleared (raise filter.max_expansions to decide them).</p>")
        shown = candidates.filter(pc.is_in(candidates["prompt_id"], pa.array(sorted(undecided), pa.string())))
        out.append(_table(["prompt", "largest clique found", "proven bound"],
                          [[f'<span class="text">{esc(c["prompt"])}</span>', esc(c["clique_size"]),
                            esc(c["clique_upper_bound"])] for c in shown.slice(0, MAX_ROWS).to_pylist()], {1, 2}))
        out.append(_more(shown.num_rows, "summary.json's undecided_prompt_ids"))
    out.append(_triage(summary))
    out.append(_pictures(summary))

    # nearest-neighbour distance histograms
    out.append("<h2>Nearest-neighbour distances</h2>")
    gen_nn = (pc.list_flatten(candidates["nearest_distances"]).to_numpy(zero_copy_only=False)
              if candidates.num_rows else np.zeros(0))
    if distances is None:
        distances = matches["distance"].to_numpy(zero_copy_only=False) if matches.num_rows else np.zeros(0)
    out.append('<div class="hists">' + histogram_svg(
        gen_nn, t["filter_edge_tiled_l2"], "tiled l2 of each generation to its nearest generation of the same prompt")
        + histogram_svg(distances, t["match_threshold"],
                        f"{t['match_distance']} of each verified candidate to its nearest training image") + "</div>")

    out.append(mia_section)
    out.append("<h2>Configuration</h2>")
    out.append(f"<details><summary>the run's full config (as JSON)</summary><pre>"
               f"{esc(json.dumps(cfg, indent=2, sort_keys=True))}</pre></details>")
    idx = summary.get("index", {})
    out.append(f'<p class="muted">index {esc(redact_urls(idx.get("uri") or ""))}: {esc(idx.get("indexed"))} '
               f'training images indexed, {esc(idx.get("quarantined"))} quarantined.</p>')
    return page(title, "\n".join(x for x in out if x))


def not_a_finished_run(layout: RunLayout) -> str:
    """What `memex report` was given instead of a finished audit's run folder, and what to give."""
    store = layout.store
    fs, path = store.fs, store.path
    up = posixpath.dirname(path)  # "" for a bucket itself (s3://bucket): nothing above it
    parent = RunLayout.at(store.uri_of(up), store.options) if up else None
    if store.exists(path) and parent is not None and parent.read_summary() is not None:  # summary.json, matches/
        return f"{layout.uri} is inside a run folder: give the folder, memex report {parent.uri}"
    if fs.isfile(path):
        return f"{layout.uri} is a file, not a run folder"
    runs = sorted(posixpath.basename(posixpath.dirname(p)) for p in fs.glob(posixpath.join(path, "*", "summary.json")))
    if runs:  # a storage.root: its run folders are one level down
        first = store.uri_of(layout.join(runs[0]))
        return (f"{layout.uri} holds {len(runs)} finished run folder(s) ({', '.join(runs[:5])}"
                f"{', ...' if len(runs) > 5 else ''}): give one, e.g. memex report {first}")
    if store.exists(layout.run_json) and layout.samples_from is not None:
        return (f"{layout.uri} is a re-match of {layout.samples_from} that has not finished (no summary.json): run "
                "the `memex audit run.samples_from=...` command that started it again; it resumes where it stopped")
    if store.exists(layout.run_json) and not store.exists(layout.index_json):
        return (f"{layout.uri} is a `memex generate` run (samples, no training-set matches): memex report reads an "
                "audit's run folder (`memex audit` with the same settings)")
    if store.exists(layout.run_json):
        return (f"{layout.uri} is an audit that has not finished (no summary.json): run the `memex audit` command "
                "that started it again; it resumes where it stopped")
    return (f"{layout.uri} has no summary.json: not a finished audit run folder (run `memex audit` to finish it, "
            "or check the path)")


def _extracted_and_distances(layout: RunLayout, units_per_read: int = 256) -> tuple[pa.Table, np.ndarray]:
    """matches/ in one pass, a few hundred units at a time: its extracted rows, and every row's distance.
    (Read whole, a candidates=all run's 175M rows of prompts and ids; a filtered read decodes every column
    anyway, the row groups mixing extracted rows and others.)"""
    units = [layout.matches.file(i) for i in layout.matches.complete()]
    kept, dist = [MATCHES_SCHEMA.empty_table()], [np.zeros(0, np.float32)]
    for k in range(0, len(units), units_per_read):
        t = layout.store.read_table(units[k:k + units_per_read], schema=MATCHES_SCHEMA)
        dist.append(t["distance"].to_numpy(zero_copy_only=False))
        kept.append(t.filter(t["extracted"]))
    return pa.concat_tables(kept), np.concatenate(dist)


def extracted_in_order(matches: pa.Table, counted: set[str] = frozenset()) -> pa.Table:
    """Extracted pairs: those of counted pictures (`counted`: summary.json's extracted_train_ids) first,
    then most certain (smallest distance) first, ties by sample_id: one order for the pairs the page
    shows and the generations build_report loads for them. (It loaded by distance alone: tiled l2 of
    uint8 images takes few values, and at the cutoff a tied row showed "not stored". By distance alone,
    flat low-complexity pictures, which the smallest distances land on, filled all MAX_PAIRS pairs
    with pictures that do not count.)"""
    if not matches.num_rows:
        return matches
    ext = matches.filter(matches["extracted"])
    other = pc.invert(pc.is_in(ext["train_id"], pa.array(sorted(counted), pa.string())))
    return (ext.append_column("_other", other)
            .sort_by([("_other", "ascending"), ("distance", "ascending"), ("sample_id", "ascending")])
            .drop_columns(["_other"]))


def build_report(run: str | RunLayout, storage_options: dict | None = None) -> str:
    """(Re)build run/report/index.html from the run folder alone; returns its URI. With a
    mia/summary.json in the folder it includes the membership-inference section."""
    layout = run if isinstance(run, RunLayout) else RunLayout.at(run, storage_options)
    store = layout.store
    summary = layout.read_summary()
    if summary is None and not store.exists(store.path):
        raise StorageError(f"{layout.uri} does not exist: check the path (a run folder is "
                           "<storage.root>/<run name>, printed by `memex audit`)")
    if summary is None:
        raise StorageError(not_a_finished_run(layout))
    if layout.samples_from is not None and layout.samples.success() is None:  # a re-match whose source went
        raise StorageError(f"{layout.uri} re-matched the generations of {layout.generated.uri}, and they are gone "
                           "(no samples/_SUCCESS.json there); the report shows them. This folder's summary.json and "
                           "matches/ are as they were: restore that run folder to rebuild the report")
    if layout.samples_from is not None:  # and still the ones it matched, not a run generated again under its name
        from memex.stages.rematch import check_source_unchanged

        check_source_unchanged(layout)
    # only what the page shows: at the paper's scale candidates/ holds 175M sample ids and matches/ a row a
    # generation (candidates=all), of which the page needs the extracted rows and one distance column
    candidates = layout.candidates.read(columns=[f.name for f in CANDIDATES_SCHEMA if f.name != "sample_ids"])
    matches, distances = _extracted_and_distances(layout)
    ext = extracted_in_order(matches, set(summary.get("extracted_train_ids", []))).slice(0, MAX_PAIRS)  # shown
    wanted = pa.array(ext["sample_id"].to_pylist(), pa.string())
    sample_png: dict[str, bytes] = {}
    if len(wanted):
        from memex.plan import SamplePlan
        from memex.prompts import read_run_prompts

        # only the shards that hold the shown pairs' prompts (SamplePlan: where each prompt's samples lie),
        # their prompts' row groups, then only the shown rows' images kept: every shard's image column was
        # read, ~250 GB for the paper's 175M generations to show 200 pairs
        row_of = {pid: k for k, pid in enumerate(read_run_prompts(layout)["prompt_id"].to_pylist())}
        plan = SamplePlan.read(layout.generated)
        pids = sorted(set(ext["prompt_id"].to_pylist()))
        shards = {s for pid in pids for s in plan.shards_of(row_of[pid])}
        for i in sorted(shards & set(layout.samples.complete())):  # (their prompts' row groups: SAMPLES_ROW_GROUP)
            t = store.read_table(layout.samples.file(i), columns=["sample_id", "image"],
                                 filters=[("prompt_id", "in", pids)])
            t = t.filter(pc.is_in(t["sample_id"], wanted))
            sample_png.update(zip(t["sample_id"].to_pylist(), t["image"].to_pylist()))
    train_png: dict[int, bytes] = {}
    if (matched_train := layout.matched_train_source()) is not None:
        t = store.read_table(matched_train, schema=MATCHED_TRAIN_SCHEMA,
                             filters=[("train_gid", "in", sorted(set(ext["train_gid"].to_pylist())))])
        train_png = dict(zip(t["train_gid"].to_pylist(), t["image"].to_pylist()))
    from memex.mia_report import read_mia, render_mia_section  # it imports this module

    mia = read_mia(store)  # <run>/mia/summary.json: `memex mia` ran on this run folder too
    html_text = render_report(summary, candidates, matches, sample_png, train_png,
                              render_mia_section(*mia) if mia is not None else "", distances)
    store.write_bytes(layout.report_path, html_text.encode())
    return store.uri_of(layout.report_path)


# ---- the nightly trend page ------------------------------------------------------------------
def render_trend(ledger: pa.Table, link_of) -> str:
    """Extracted images and flagged prompts against training step, per series and config, with run links.

    `link_of(row) -> str | None`: the href of a row's report (relative when it can be)."""
    # a final model (no step) after its series' checkpoints, as memex nightly audits it
    rows = sorted(ledger.to_pylist(), key=lambda r: (r["series"], r["step"] is None, r["step"] or 0,
                                                      r["finished"] or dt.datetime.min.replace(tzinfo=dt.timezone.utc)))
    out = ["<h1>memex nightly: memorization by checkpoint</h1>",
           f'<p class="muted">{len(rows)} audits in the ledger &middot; built '
           f'{esc(dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))}</p>']
    # an error that a later night's audit of the same weights and config finished is no longer open
    done = {(r["weights_sha256"], r["config_sha256"]) for r in rows if r["outcome"] != "error"}
    alarms = [r for r in rows if r["outcome"] in ALARMS
              or r["outcome"] == "error" and (r["weights_sha256"], r["config_sha256"]) not in done]
    if alarms:
        out.append(_cards([("audits with an alarm or an error not since retried", len(alarms), True)]))
    # a line per series and config: after a config change, two audits of one step are two results,
    # and one line through both zig-zagged between them
    series: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        series.setdefault((r["series"], r["config_sha256"]), []).append(r)
    configs: dict[str, int] = {}
    for name, _ in series:
        configs[name] = configs.get(name, 0) + 1
    for (name, sha), rs in series.items():
        # a result: every audit that finished, one whose tracker then failed included (error, samples > 0) until
        # a later night's retry of the same weights finished (its row is the result: one point a checkpoint)
        ok = [r for r in rs if r["outcome"] != "error"
              or r["samples"] and (r["weights_sha256"], r["config_sha256"]) not in done]
        stepped = [r for r in ok if r["step"] is not None]
        tag = f' <span class="muted">config {esc(sha[:12])}</span>' if configs[name] > 1 else ""
        out.append(f"<h2>{esc(name)}{tag}</h2>")
        out.append(line_chart_svg([r["step"] for r in stepped],
                                  {"training images extracted": [r["extracted"] for r in stepped],
                                   "prompts flagged": [r["flagged_prompts"] for r in stepped]}, "training step"))
        table_rows = []
        for r in rs:
            href = link_of(r) if r["outcome"] != "error" or r["samples"] else None  # its report was written
            link = f'<a href="{esc(href)}">report</a>' if href else ""
            # a failed audit counted nothing: its row's zeros are no result (a clean checkpoint read "0 extracted");
            # an audit that finished and whose tracker failed has its counts (samples > 0)
            counts = ["&ndash;"] * 3 if r["outcome"] == "error" and not r["samples"] else \
                [esc(r["extracted"]), esc(r["flagged_prompts"]), esc(r["samples"])]
            table_rows.append([esc(r["step"]), f'<span class="text">{esc(r["location"])}</span>', *counts,
                               f'<b>{esc(r["outcome"])}</b> <span class="text">{esc(r["message"])}</span>'
                               if r["outcome"] != "ok" else "ok",
                               esc(r["finished"].strftime("%Y-%m-%d %H:%M") if r["finished"] else ""), link])
        out.append(_table(["step", "checkpoint", "extracted", "flagged", "samples", "outcome", "finished", ""],
                          table_rows, {0, 2, 3, 4}))
    return page("memex nightly trend", "\n".join(out))
