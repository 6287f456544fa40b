"""The audit report: rendered in headless Chromium, hostile captions shown as text, rebuilt from the
run folder alone.

The run is planted (as in test_audit): prompt A's 10 generations are near-copies of training image
t02, whose caption and A's prompt are HTML/JS payloads scraped-data style; prompt B's are unrelated.
Expected by construction: 10 extracted pairs, all of t02, one flagged prompt, no script executed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex.images import encode_png
from memex.layout import RunLayout
from memex.report import build_report, esc, histogram_svg
from memex.stages import filter as filter_stage
from memex.stages import index, match

from conftest import attach_index, blocky, compose, free_port, plant_run

N_TRAIN, N_SAMPLES = 12, 10
EVIL_CAPTION = "<script>document.title='pwned';console.error('xss')</script> ACME & \"Co\" logo"
EVIL_PROMPT = "<img src=x onerror=\"console.error('xss')\"> a copy of the ACME logo"
PROMPTS = [EVIL_PROMPT, "something new"]




@pytest.fixture(scope="module")
def audited_run(tmp_path_factory, ray_head):
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("report")
    train = [blocky(rng) for _ in range(N_TRAIN)]
    captions = [f"caption {i}" for i in range(N_TRAIN)]
    captions[2] = EVIL_CAPTION
    manifest = root / "train.parquet"
    pq.write_table(pa.table({"id": [f"t{i:02d}" for i in range(N_TRAIN)], "image": [encode_png(t) for t in train],
                             "caption": captions}), manifest)
    samples = {PROMPTS[0]: [np.clip(train[2].astype(int) + rng.integers(-2, 3, train[2].shape), 0, 255).astype(np.uint8)
                            for _ in range(N_SAMPLES)],
               PROMPTS[1]: [blocky(rng) for _ in range(N_SAMPLES)]}
    layout = plant_run(root / "runs", "planted", samples)

    cfg = compose([f"trainset.path={manifest}", f"storage.root={root / 'runs'}", "model.path=/planted",
                   f"sampling.samples_per_prompt={N_SAMPLES}", "sampling.shard_size=8", "index.shards=2",
                   f"resources.address={ray_head.address}"], config_name="audit")
    attach_index(layout, index.run(cfg))
    filter_stage.run(cfg, "planted")
    summary = match.run(cfg, "planted")
    assert summary["extracted_generations"] == N_SAMPLES and summary["extracted_train_ids"] == ["t02"]
    return layout, summary, root


def test_report_renders_without_console_errors_and_shows_the_pairs(audited_run, browser, tmp_path):
    layout, summary, _ = audited_run
    uri = build_report(layout)
    assert uri == layout.store.uri_of(layout.report_path)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: problems.append(f"request {r.url}")
            if not r.url.startswith(("file:", "data:")) else None)
    page.goto(Path(uri).as_uri())
    page.wait_for_load_state("load")
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot))  # the viewport: Chromium's full-page capture is flaky under load
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    assert problems == []  # no console errors, no failed image, no network fetch

    pairs = page.locator(".pair")
    assert pairs.count() == N_SAMPLES
    # each pair shows the generation and the training image, both decoded by the browser
    widths = page.eval_on_selector_all(".pair img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 2 * N_SAMPLES and all(w == 32 for w in widths)
    assert "training t02" in pairs.first.inner_text()
    # most certain first
    shown = [float(t.split()[-1]) for t in page.locator(".pair b").all_inner_texts()]
    assert shown == sorted(shown) and shown[0] <= summary["thresholds"]["match_threshold"]

    # the hostile caption and prompt are text: visible verbatim, no element created, nothing ran
    text = page.inner_text("body")
    assert EVIL_CAPTION in text and EVIL_PROMPT in text
    assert page.locator("script").count() == 0 and page.title() == "memex audit: demo"
    assert page.locator("img[src='x']").count() == 0
    # headline, flagged prompt with its clique size, two histograms with their threshold lines
    assert page.locator(".card b").first.inner_text() == "1"
    row = page.locator("table tbody tr").first.inner_text()
    assert EVIL_PROMPT in row and f"\t{N_SAMPLES}\t" in f"\t{row}\t".replace("\n", "\t")
    assert page.locator("svg[aria-label] line[stroke='#d93025']").count() == 2
    assert '"min_clique": 5' in page.text_content("details pre")
    page.close()


def test_report_is_rebuilt_from_the_run_folder_alone(audited_run, tmp_path):
    """`memex report RUN` on a copy of the run folder, with the index and training set gone."""
    layout, summary, root = audited_run
    copy = tmp_path / "elsewhere" / "planted"
    shutil.copytree(layout.path, copy)
    (copy / "report").exists() and shutil.rmtree(copy / "report")
    gone = [root / "runs" / "_index", root / "train.parquet"]  # moved away for the rebuild, then back (module-scoped)
    for p in gone:
        p.rename(p.with_name(p.name + ".away"))
    try:
        out = subprocess.run([str(Path(sys.executable).parent / "memex"), "report", str(copy)], capture_output=True,
                             text=True, timeout=120, cwd=tmp_path)
    finally:
        for p in gone:
            p.with_name(p.name + ".away").rename(p)
    assert out.returncode == 0, out.stderr
    html = (copy / "report" / "index.html").read_text()
    assert html.count('class="pair"') == N_SAMPLES
    assert html.count("data:image/png;base64,") == 2 * N_SAMPLES  # both images of every pair, embedded
    assert esc(EVIL_CAPTION) in html and EVIL_CAPTION not in html

    bad = subprocess.run([str(Path(sys.executable).parent / "memex"), "report", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "nope does not exist: check the path" in bad.stderr


def test_report_of_a_run_folder_in_the_previous_layout(audited_run, tmp_path):
    """Run folders written when summary.json and train_images.parquet were kept in matches/ still
    give their report (and their summary to `memex audit` and nightly: RunLayout.read_summary)."""
    layout, summary, _ = audited_run
    old = tmp_path / "old" / "planted"
    shutil.copytree(layout.path, old)
    (old / "summary.json").rename(old / "matches" / "summary.json")
    (old / "matched_train_images.parquet").rename(old / "matches" / "train_images.parquet")
    html = Path(build_report(str(old))).read_text()
    assert html.count("data:image/png;base64,") == 2 * N_SAMPLES  # the training images were found too
    assert RunLayout.at(str(old)).read_summary() == summary


def test_histogram_marks_the_threshold_and_counts_every_value():
    svg = histogram_svg([0.01, 0.02, 0.3, 0.31, 0.32], 0.15, "d", bins=10)
    counts = [int(x.split("<title>")[1].split("<")[0]) for x in svg.split("<rect")[1:]]
    # range 0..0.336 (max x 1.05) in 10 bins of 0.0336: 0.01, 0.02 -> bin 0; 0.30 -> 8; 0.31, 0.32 -> 9
    assert [(i, c) for i, c in enumerate(counts) if c] == [(0, 2), (8, 1), (9, 2)]
    assert "threshold 0.15" in svg and "n = 5" in svg
    assert "no d to plot" in histogram_svg([], 0.15, "d")


def test_pictures_and_undecided_prompts_are_shown():
    """A picture stored as 3 rows is one extracted picture with its rows listed; an undecided prompt
    (clique search out of budget) gets a card and its own table, with its text escaped."""
    from memex.layout import CANDIDATES_SCHEMA, MATCHES_SCHEMA
    from memex.report import render_report

    summary = {"thresholds": {"min_clique": 10, "filter_edge_tiled_l2": 0.15, "match_distance": "tiled_l2",
                              "match_k": 10, "match_threshold": 0.15},
               "model": {"name": "m", "path": "/m"}, "run": "/r", "samples": 40, "prompts": 1,
               "prompts_flagged": 0, "prompts_undecided": 1, "undecided_prompt_ids": ["p0"],
               "candidates_verified": 0, "extracted_generations": 0, "extracted_unique_train_images": 1,
               "extracted_pictures": [{"picture": "a", "rows": ["a", "a#1", "a#2"], "generations": 4}]}
    cand = pa.Table.from_pylist([{"prompt_id": "p0", "prompt": "<b>hard</b>", "n_samples": 40, "clique_size": 8,
                                  "clique_upper_bound": 11, "clique_exact": False, "flagged": False, "sample_ids": [],
                                  "representative": "", "nearest_distances": []}], schema=CANDIDATES_SCHEMA)
    html = render_report(summary, cand, MATCHES_SCHEMA.empty_table(), {}, {})
    assert "Extracted training pictures (1)" in html and "3: <span" in html and "a, a#1, a#2" in html
    assert "Undecided prompts (1)" in html and "&lt;b&gt;hard&lt;/b&gt;" in html and "<b>hard</b>" not in html
    assert "prompts undecided" in html


def _summary(**extra) -> dict:
    """A minimal summary.json of the older form (before UNet counts, budget, triage, uncounted pictures)."""
    base = {"thresholds": {"min_clique": 10, "filter_edge_tiled_l2": 0.15, "match_distance": "tiled_l2",
                           "match_k": 10, "match_threshold": 0.15},
            "model": {"name": "m", "path": "/m"}, "run": "/r", "samples": 40, "prompts": 3, "prompts_flagged": 0,
            "candidates_verified": 0, "extracted_generations": 0, "extracted_unique_train_images": 0}
    return {**base, **extra}


def _render(summary: dict) -> str:
    from memex.layout import CANDIDATES_SCHEMA, MATCHES_SCHEMA
    from memex.report import render_report

    return render_report(summary, CANDIDATES_SCHEMA.empty_table(), MATCHES_SCHEMA.empty_table(), {}, {})


def _cards(html: str) -> dict[str, str]:
    """card label -> its value, as rendered."""
    import re

    return {k: v for v, k in re.findall(r'<div class="card[^"]*"><b>(.*?)</b>(.*?)</div>', html)}


def test_unet_evaluation_cards_and_cost_text():
    html = _render(_summary(
        unet_evaluations=1234567, unet_evaluations_triage=4000, unet_evaluations_padding=36,
        unet_evaluations_per_extracted_image=617284, prompts_sampled=2, candidates="cliques",
        budget={"kind": "adaptive", "rounds": [{"prompts": 3, "samples": [0, 4]}, {"prompts": 1, "samples": [4, 16]}]}))
    cards = _cards(html)
    assert cards["UNet evaluations"] == "1,234,567"
    assert cards["UNet evaluations per extracted image"] == "617,284"
    assert "Cost: 1,234,567 UNet evaluations" in html and "guidance counts 2 per row" in html
    assert "triage 4,000" in html and "36 included" in html
    assert "2 of 3 prompts sampled" in html and "the generations in flagged cliques" in html
    assert "<li>round 0: 3 prompts x samples [0, 4)</li><li>round 1: 1 prompts x samples [4, 16)</li>" in html

    # no extracted picture: no per-image card; a fixed budget lists no rounds
    html = _render(_summary(unet_evaluations=800, unet_evaluations_per_extracted_image=None,
                            budget={"kind": "fixed", "rounds": [{"prompts": 3, "samples": [0, 4]}]}))
    cards = _cards(html)
    assert cards["UNet evaluations"] == "800" and "UNet evaluations per extracted image" not in cards
    assert "round 0:" not in html and "Adaptive budget" not in html


def test_triage_section_only_when_prompts_have_scores():
    def pp(i, score, extracted):
        return {"prompt_id": f"p{i}", "prompt": f"<i>prompt {i}</i>", "samples": 4 + i, "triage_score": score,
                "extracted_samples": extracted, "flagged": False, "clique_size": None, "train_ids": []}

    per_prompt = [pp(i, 0.01 * i, 3 if i == 11 else 0) for i in range(12)]
    html = _render(_summary(per_prompt=per_prompt))
    assert "<h2>Triage</h2>" in html
    assert "triage score of prompts with an extracted generation (n = 1," in html
    assert "triage score of the other prompts (n = 11," in html
    assert "stroke=\"#d93025\"" not in html.split("<h2>Triage</h2>")[1].split("<h2>")[0]  # no threshold line
    top = html.split("Top 10 prompts by triage score")[1].split("</table>")[0]
    rows = top.split("<tr>")[2:]
    assert len(rows) == 10
    # highest first, with its samples and extracted count; prompt text escaped; the 2 lowest left out
    assert "&lt;i&gt;prompt 11&lt;/i&gt;</span></td><td class=num>0.11</td><td class=num>15</td><td class=num>3</td>" \
        in rows[0]
    assert "prompt 10&lt;" in rows[1] and "prompt 1&lt;" not in top and "prompt 0&lt;" not in top

    unscored = [{**p, "triage_score": None} for p in per_prompt]
    for html in (_render(_summary(per_prompt=unscored)), _render(_summary())):
        assert "Triage" not in html and "triage score" not in html
    # a NaN score (fp16 UNet outputs) first: it won max() and the histogram raised "cannot convert float
    # NaN to integer", failing the audit at its last step; it is left out like a missing one
    html = _render(_summary(per_prompt=[pp(0, float("nan"), 0)] + per_prompt[1:]))
    assert "triage score of the other prompts (n = 10," in html and "nan" not in html.split("<h2>Triage")[1]


def test_preview_triage_plots_the_previews_distances_against_the_threshold():
    per_prompt = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "samples": 4, "triage_score": -0.05 * i,
                   "triage_distance": 0.05 * i, "extracted_samples": 2 if i < 2 else 0, "flagged": False,
                   "clique_size": None, "train_ids": []} for i in range(1, 13)]
    html = _render(_summary(per_prompt=per_prompt))
    section = html.split("<h2>Triage</h2>")[1].split("<h2>")[0]
    assert "closest preview of prompts with an extracted generation (n = 1," in section
    assert "closest preview of the other prompts (n = 11," in section
    assert section.count("threshold 0.15") == 2  # the match threshold on both histograms
    rows = section.split("The 10 prompts whose previews came closest")[1].split("</table>")[0].split("<tr>")[2:]
    assert len(rows) == 10 and "prompt 1<" in rows[0] and "0.05<" in rows[0] and "prompt 12<" not in section
    assert "triage score" not in section  # the Wen et al. histograms are not drawn


def test_uncounted_low_complexity_picture_is_listed_with_its_reason():
    summary = _summary(
        extracted_unique_train_images=1,
        thresholds={**_summary()["thresholds"], "min_generations": 1, "low_detail_min_generations": 3},
        extracted_pictures=[{"picture": "busy", "rows": ["busy"], "generations": 2, "in_clique": 1, "detail": 0.4,
                             "low_complexity": False, "counted": True}],
        uncounted_pictures=[{"picture": "<flat>", "rows": ["<flat>", "<flat>#1"], "generations": 2, "in_clique": 0,
                             "detail": 0.0123, "low_complexity": True, "counted": False}])
    html = _render(summary)
    counted = html.split("Extracted training pictures (1)")[1].split("</table>")[0]
    assert "<th class=num>copying generations</th><th class=num>in a clique</th><th class=num>tile detail</th>" \
        in counted
    assert "<td>busy</td><td class=num>2</td><td class=num>1</td><td class=num>0.4</td><td></td>" in counted
    assert "flat" not in counted
    uncounted = html.split("<h2>Not counted (1)</h2>")[1].split("</table>")[0]
    assert ("<td>&lt;flat&gt;</td><td class=num>2</td><td class=num>0</td><td class=num>0.0123</td><td>yes</td>"
            "<td class=num></td><td>low complexity: 2 copying generation(s), none in a flagged clique or closer "
            "than its tile mosaic; needs 3</td>") in uncounted
    assert "&lt;flat&gt;, &lt;flat&gt;#1" in uncounted and "<flat>" not in html


def test_uncounted_generic_picture_gives_its_margin():
    summary = _summary(
        thresholds={**_summary()["thresholds"], "max_margin": 0.6},
        uncounted_pictures=[{"picture": "tri", "rows": ["tri"], "generations": 2, "in_clique": 0, "detail": 0.3,
                             "low_complexity": False, "margin": 0.64, "distinct": False, "counted": False}])
    uncounted = _render(summary).split("<h2>Not counted (1)</h2>")[1].split("</table>")[0]
    assert ("<td class=num>0.64</td><td>not distinct: its closest copy is 0.64 of the way to the next training "
            "picture; needs 0.6</td>") in uncounted


def test_generations_near_uncounted_pictures_are_not_shown_as_an_alarm():
    """A clean audit (no counted picture) whose generations came within the threshold of a low-complexity
    look-alike read "0 training images extracted" beside a red "7 extracted generations"."""
    import re

    def alarms(html):
        return dict((k, v) for v, k in re.findall(r'<div class="card alarm"><b>(.*?)</b>(.*?)</div>', html))

    pp = {"prompt_id": "p0", "prompt": "sky", "samples": 16, "extracted_samples": 7, "counted_samples": 0,
          "flagged": False, "clique_size": None, "train_ids": ["sky-1"], "counted_train_ids": []}
    clean = _render(_summary(extracted_unique_train_images=0, extracted_generations=7, counted_generations=0,
                             per_prompt=[pp]))
    assert alarms(clean) == {} and _cards(clean)["generations within the threshold"] == "7"
    assert _cards(clean)["generations copying them"] == "0"
    old = _render(_summary(extracted_unique_train_images=1, extracted_generations=7,  # no counted_generations key
                           per_prompt=[pp | {"counted_samples": 3, "counted_train_ids": ["a"]}]))
    assert alarms(old) == {"training images extracted": "1", "generations copying them": "3"}


def test_old_summary_without_the_new_keys_still_renders():
    html = _render(_summary(extracted_unique_train_images=1,
                            extracted_pictures=[{"picture": "a", "rows": ["a", "a#1"], "generations": 4}]))
    cards = _cards(html)
    assert cards["training images extracted"] == "1" and not any("UNet" in k for k in cards)
    assert "Cost:" not in html and "Triage" not in html and "Not counted" not in html
    assert ("<td>a</td><td class=num>4</td><td class=num></td><td class=num></td><td></td><td class=num></td>"
            "<td>2: <span") in html


@pytest.mark.parametrize("args, code, line", [
    (["{run}", "--storage-options", "{{bad"], 2,
     "memex report: error: --storage-options must be a JSON object such as "),
    (["{run}", "--storage-options", "[1]"], 2, "memex report: error: --storage-options must be a JSON object"),
    (["{run}/nowhere"], 1, "memex: error: {run}/nowhere does not exist: check the path"),
    (["{tmp}"], 1, "memex: error: {tmp} holds 1 finished run folder(s) (r): give one, e.g. memex report {run}"),
    (["{tmp}/r/summary.json"], 1, "memex: error: {run}/summary.json is not readable JSON"),
    (["gs://bucket/runs/r"], 1, "memex: error: run=gs://bucket/runs/r: gs:// needs a package that is not installed"),
    (["{run}"], 1, "memex: error: {run}/summary.json is not readable JSON (JSONDecodeError"),
])
def test_report_command_names_bad_input_in_one_line(args, code, line, tmp_path, monkeypatch, capsys):
    """`memex report` with options that are not a JSON object (json's bare message before), a folder that
    is not a finished run, a summary.json cut short: one line naming it, no traceback, nothing written."""
    from memex import cli

    run = tmp_path / "r"
    run.mkdir()
    (run / "summary.json").write_text('{"extracted": ')
    monkeypatch.setattr(sys, "argv", ["memex", "report", *(a.format(run=run, tmp=tmp_path) for a in args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == code and line.format(run=run, tmp=tmp_path) in err and "Traceback" not in err, err
    assert sorted(p.name for p in run.iterdir()) == ["summary.json"]


def test_report_names_what_it_was_given_instead_of_a_run_folder(tmp_path, monkeypatch, capsys):
    """`memex report` on the storage root, on a file or folder inside a run, on a generate run or on an
    audit that stopped: each was "has no summary.json: not a finished audit run folder", which named
    neither the run folder meant nor what to run."""
    from memex import cli

    root = tmp_path / "runs"
    for name, files in {"demo-a": ["summary.json", "run.json", "index.json"], "demo-b": ["run.json"],
                        "demo-c": ["run.json", "index.json"]}.items():
        (root / name / "matches").mkdir(parents=True)
        for f in files:
            (root / name / f).write_text("{}")
    (root / "notes.txt").write_text("x")
    cases = {root: f"{root} holds 1 finished run folder(s) (demo-a): give one, e.g. memex report {root}/demo-a",
             root / "demo-a" / "summary.json": f"is inside a run folder: give the folder, memex report {root}/demo-a",
             root / "demo-a" / "matches": f"is inside a run folder: give the folder, memex report {root}/demo-a",
             root / "notes.txt": "notes.txt is a file, not a run folder",
             root / "demo-b": "demo-b is a `memex generate` run (samples, no training-set matches)",
             root / "demo-c": "demo-c is an audit that has not finished (no summary.json): run the `memex audit`",
             root / "demo-c" / "matches": "has no summary.json: not a finished audit run folder"}
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for given, line in cases.items():
        monkeypatch.setattr(sys, "argv", ["memex", "report", str(given)])
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = capsys.readouterr().err
        assert e.value.code == 1 and line in err and "Traceback" not in err, (given, err)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written


def test_the_trend_draws_a_line_per_series_and_config_and_counts_open_errors():
    """After a config change, a series' steps are audited again: one line through both configs'
    results zig-zagged between them, so each config gets its own chart. An error that a later
    night's audit of the same weights finished is not counted as open (every past error was)."""
    import datetime as dt

    from memex.layout import LEDGER_SCHEMA
    from memex.report import render_trend

    def row(step, sha, outcome, extracted, weights=None, day=1):
        t = dt.datetime(2026, 12, day, tzinfo=dt.timezone.utc)
        return {k: None for k in LEDGER_SCHEMA.names} | {
            "location": f"/runs/a/checkpoint-{step}", "series": "/runs/a", "step": step, "base": "",
            "weights_sha256": weights or f"w{step}", "files_signature": "", "config_sha256": sha, "run": "r",
            "report": "r/report/index.html", "samples": 8, "extracted": extracted, "extracted_generations": 0,
            "flagged_prompts": 0, "started": t, "finished": t, "outcome": outcome, "message": ""}

    rows = [row(1000, "a" * 64, "ok", 1), row(2000, "a" * 64, "error", 0), row(2000, "a" * 64, "ok", 2, day=2),
            row(1000, "b" * 64, "ok", 9), row(2000, "b" * 64, "grew", 12),
            row(3000, "b" * 64, "error", 0) | {"samples": 0}]  # as nightly writes a failed audit's row
    page = render_trend(pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA), lambda r: None)
    assert page.count("<h2>") == 2 and "config aaaaaaaaaaaa" in page and "config bbbbbbbbbbbb" in page
    assert page.count("<svg") == 2
    # open: the alarm (grew) and step 3000's error; step 2000's error of config a was retried and finished
    assert '<div class="card alarm"><b>2</b>audits with an alarm or an error not since retried</div>' in page
    # a failed audit's row counted nothing: no "0 extracted, 0 flagged, 8 samples" read as a clean checkpoint
    cells = page.split("checkpoint-3000</span></td>")[1].split("</tr>")[0]
    assert cells.startswith("<td class=num>&ndash;</td>" * 3 + "<td><b>error")
    ok = page.split("checkpoint-2000</span></td>")[-1].split("</tr>")[0]
    assert ok.startswith("<td class=num>12</td><td class=num>0</td><td class=num>8</td>")

    from memex.stages.nightly import NightlyResult, format_result

    text = format_result(NightlyResult("b" * 64, 3, [], rows=[rows[-1] | {"message": "OSError: gone"}, rows[-2]]))
    assert "  error       step 3000:   /runs/a/checkpoint-3000  -- OSError: gone" in text
    assert "  grew        step 2000: 12 training images extracted, 0 prompts flagged  /runs/a/checkpoint-2000" in text
    # an audit that finished and whose tracker failed (an error row with its samples): its counts are real
    text = format_result(NightlyResult("b" * 64, 3, [], rows=[rows[-2] | {"outcome": "error", "message": "mlflow"}]))
    assert "  error       step 2000: 12 training images extracted, 0 prompts flagged" in text


def test_the_pairs_loaded_are_the_pairs_shown_when_distances_tie():
    """build_report loaded the generations of the first MAX_PAIRS rows by distance alone (table order
    breaking ties), the page showed them by (distance, sample_id): a tied row at the cutoff showed
    "generation ... not stored". One order now serves both."""
    import pyarrow as pa

    from memex.report import extracted_in_order

    m = pa.table({"sample_id": ["b/0", "a/1", "a/0", "c/0"], "train_id": ["t"] * 4, "distance": [0.1, 0.1, 0.1, 0.05],
                  "extracted": [True, True, True, False]})
    assert extracted_in_order(m)["sample_id"].to_pylist() == ["a/0", "a/1", "b/0"]
    assert extracted_in_order(m, {"t"})["sample_id"].to_pylist() == ["a/0", "a/1", "b/0"]


def _match_rows(rows: list[tuple[str, str, int, float, float]]):
    """MATCHES_SCHEMA rows: (sample_id, train_id, train_gid, distance, train_detail), all extracted."""
    from memex.layout import MATCHES_SCHEMA

    return pa.Table.from_pylist([{"sample_id": s, "prompt_id": s.split("/")[0], "prompt": "p", "train_gid": g,
                                  "train_id": t, "train_caption": "c", "distance": d, "embed_distance": 0.1,
                                  "neighbor_rank": 0, "extracted": True, "train_detail": det, "margin": 0.1}
                                 for s, t, g, d, det in rows], schema=MATCHES_SCHEMA)


def test_pairs_of_counted_pictures_come_first_and_the_others_say_why_not(monkeypatch):
    """The pairs were every generation within the threshold by distance alone, capped at MAX_PAIRS. With
    candidates=all, flat low-complexity pictures (the smallest tiled l2) filled every slot and the counted
    copies fell into "N more in matches/", unlabelled under "training images extracted: 1". Pairs of
    counted pictures now come first, and each other pair names why its picture does not count."""
    from memex import report
    from memex.layout import CANDIDATES_SCHEMA

    flat = [(f"f/{k}", "sky", 7, 0.01 + k / 1000, 0.05) for k in range(3)]  # nearer than any copy
    logo = [(f"l/{k}", "logo", 3, 0.10 + k / 1000, 0.4) for k in range(2)]
    summary = _summary(
        extracted_generations=5, extracted_unique_train_images=1, extracted_train_ids=["logo"],
        thresholds={**_summary()["thresholds"], "min_generations": 2, "low_detail_min_generations": 4},
        extracted_pictures=[{"picture": "logo", "rows": ["logo"], "generations": 2, "counted": True}],
        uncounted_pictures=[{"picture": "sky", "rows": ["sky"], "generations": 3, "low_complexity": True,
                             "distinct": True, "counted": False, "detail": 0.05}])
    matches = _match_rows(flat + logo)
    monkeypatch.setattr(report, "MAX_PAIRS", 2)
    html = report.render_report(summary, CANDIDATES_SCHEMA.empty_table(), matches, {}, {})
    assert "<h2>Extracted generations (5: 2 of counted pictures)</h2>" in html
    shown = [s.split("<")[0] for s in html.split("<figcaption>generation ")[1:]]
    assert shown == ["l/0", "l/1"] and "<b>not counted</b>" not in html
    monkeypatch.setattr(report, "MAX_PAIRS", 200)
    html = report.render_report(summary, CANDIDATES_SCHEMA.empty_table(), matches, {}, {})
    shown = [s.split("<")[0] for s in html.split("<figcaption>generation ")[1:]]
    assert shown == ["l/0", "l/1", "f/0", "f/1", "f/2"]
    assert html.count("<b>not counted</b>: low complexity: 3 copying generation(s), none in a flagged clique or "
                      "closer than its tile mosaic; needs 4</div>") == 3


def test_preview_triage_draws_no_threshold_of_another_distance():
    """A re-match by relative l2 (run.samples_from=<a triage=preview run> match=relative) keeps the source's
    preview distances (tiled l2) and has a relative-l2 threshold: the page drew "threshold 0.9" on the
    tiled-l2 axis, stretched to 0.95, the previews squeezed into its left third."""
    per = [{"prompt_id": f"p{k}", "prompt": f"p{k}", "samples": 4, "triage_distance": 0.05 + k / 100,
            "counted_samples": int(k == 0)} for k in range(5)]
    tiled = _render(_summary(per_prompt=per))
    triage = tiled.split("<h2>Triage</h2>")[1].split("<h2>")[0]
    assert "threshold 0.15" in triage
    rel = _render(_summary(per_prompt=per, thresholds={**_summary()["thresholds"], "match_distance": "relative_l2",
                                                         "match_threshold": 0.9}))
    triage = rel.split("<h2>Triage</h2>")[1].split("<h2>")[0]
    assert "threshold" not in triage.split("<p>The ")[0].split("</p>", 1)[1] and "0.945" not in triage


def test_the_console_gives_each_uncounted_pictures_own_reason():
    """The console said "fewer than <low_detail_min_generations> copying generations" for every
    low-complexity picture, also one refused as not distinct, and left the other uncounted pictures
    out (3 copies verified, 0 extracted, no word why); a low-complexity picture needs the larger of
    match.min_generations and match.low_detail_min_generations (short of min_generations: that count,
    tests/test_report.py::test_a_low_complexity_picture_short_of_min_generations_is_told_that_not_the_clique_rule)."""
    from memex.stages.audit import format_summary

    s = _summary(index={"quarantined": 0, "uri": "/i"},
                 thresholds={**_summary()["thresholds"], "min_generations": 2, "low_detail_min_generations": 3,
                             "max_margin": 0.6},
                 uncounted_pictures=[
                     {"picture": "logo-7", "rows": ["logo-7"], "generations": 3, "low_complexity": True,
                      "margin": 0.9, "distinct": False, "counted": False},
                     {"picture": "sky", "rows": ["sky"], "generations": 2, "low_complexity": True, "counted": False},
                     {"picture": "tri", "rows": ["tri"], "generations": 1, "low_complexity": False, "counted": False}])
    line = next(x for x in format_summary(s).splitlines() if "not counted" in x)
    assert line.startswith("  3 pictures within the threshold but not counted: logo-7 (not distinct: its closest "
                           "copy is 0.90 of the way to the next training picture; needs 0.6)"), line
    assert "sky (low complexity: 2 copying generation(s), none in a flagged clique or closer than its tile " \
           "mosaic; needs 3)" in line and "tri (1 copying generation(s); needs 2)" in line


def test_the_page_says_what_ran_for_an_unconditional_model_with_relative_l2():
    """An unconditional model's audit skips the filter and matches by relative l2: the page described
    the clique filter ("No prompt reached the clique size") and "its 10 nearest in the index"."""
    thresholds = {**_summary()["thresholds"], "match_distance": "relative_l2", "match_threshold": 0.9}
    html = _render(_summary(thresholds=thresholds, filter="skipped: an unconditional model's samples share one "
                                                          "prompt"))
    assert "Filter: skipped: an unconditional model&#x27;s samples share one prompt." in html \
        or "Filter: skipped: an unconditional model's samples share one prompt." in html, html
    assert "relative to its mean distance to the nearest distinct training pictures" in html
    assert "nearest in the index" not in html and "clique size" not in html and "The filter did not run." in html
    assert "of its 10 nearest in the index" in _render(_summary())  # tiled l2: as before


def test_a_prompt_whose_only_copies_were_not_counted_is_not_shown_as_extracting():
    """per_prompt's extracted_samples holds every generation within the threshold, also of pictures not
    counted (low complexity, a generic look-alike): the triage histograms split prompts by it, so a
    prompt with no extracted picture was drawn among the extracting ones. counted_samples decides now
    (an older summary without it: as before)."""
    def pp(i, extracted, counted):
        return {"prompt_id": f"p{i}", "prompt": f"prompt {i}", "samples": 4, "triage_score": 0.1 * (i + 1),
                "extracted_samples": extracted, "counted_samples": counted, "flagged": False, "train_ids": ["sky"],
                "counted_train_ids": []}

    html = _render(_summary(per_prompt=[pp(0, 3, 0), pp(1, 0, 0)]))
    assert "no triage score of prompts with an extracted generation to plot" in html
    assert "triage score of the other prompts (n = 2," in html
    old = [{k: v for k, v in pp(0, 3, 0).items() if not k.startswith("counted")}, pp(1, 0, 0)]
    assert "triage score of the other prompts (n = 1," in _render(_summary(per_prompt=old))


def test_the_report_reads_only_the_shards_of_the_shown_pairs(audited_run, monkeypatch):
    """The report showed at most 200 pairs but read every samples shard's image column to find them
    (~250 GB at the paper's 175M generations). Now only the shards holding the shown pairs' prompts
    (20 samples in shards of 8: the copying prompt's lie in shards 0 and 1, the other's in 1 and 2)."""
    from memex.storage import Store

    layout, summary, _ = audited_run
    read = []
    real = Store.read_table
    monkeypatch.setattr(Store, "read_table", lambda self, path, *a, **k: read.append(str(path)) or
                        real(self, path, *a, **k))
    html = Path(build_report(layout)).read_text()
    shards = sorted(p for p in read if "/samples/" in p)
    assert shards == [layout.samples.file(0), layout.samples.file(1)], shards
    assert "not stored" not in html and html.count("data:image/png") >= 2 * min(N_SAMPLES, 8)


def test_long_tables_are_cut_with_a_count_of_the_rest(monkeypatch):
    """Pairs were capped at MAX_PAIRS, but the picture and prompt tables were not: with match.candidates=all
    a large audit's "Not counted" table ran to tens of thousands of rows in one HTML file."""
    from memex import report

    monkeypatch.setattr(report, "MAX_ROWS", 2)
    flat = {"generations": 1, "low_complexity": False, "distinct": True, "counted": False}
    html = _render(_summary(thresholds={**_summary()["thresholds"], "min_generations": 2},
                            uncounted_pictures=[{"picture": f"u{k}", "rows": [f"u{k}"], **flat} for k in range(5)]))
    table = html.split("<h2>Not counted (5)</h2>")[1].split("</table>")[0]
    assert table.count("<td>u") == 2 and "<td>u0</td>" in table and "<td>u2</td>" not in table
    assert '<p class="muted">3 more in uncounted_pictures in summary.json.</p>' in html


def test_matches_are_read_in_one_pass_of_unit_batches(audited_run):
    """build_report reads matches/ a few hundred units at a time: the extracted rows and every distance, the
    same as reading it whole (here one unit a read)."""
    from memex.report import _extracted_and_distances

    layout, _, _ = audited_run
    whole = layout.matches.read()
    ext, dist = _extracted_and_distances(layout, units_per_read=1)
    assert len(layout.matches.complete()) > 1 and ext.equals(whole.filter(whole["extracted"]))
    assert np.array_equal(dist, whole["distance"].to_numpy()) and ext.num_rows < whole.num_rows


def test_report_on_a_bucket_root_and_an_unreachable_endpoint_says_so_in_one_line(s3_server, bucket, monkeypatch,
                                                                                 capsys):
    """`memex report s3://bucket` (storage.root a bucket itself) looked on local disk for ./s3:/bucket, and
    an endpoint that refuses connections printed botocore's traceback, unredacted."""
    import json

    import s3fs

    from memex import cli

    fs = s3fs.S3FileSystem(**s3_server)
    for f in ("summary.json", "run.json", "index.json"):
        fs.pipe_file(f"{bucket}/demo-a/{f}", b"{}")
    dead = {**s3_server, "client_kwargs": {**s3_server["client_kwargs"], "endpoint_url": f"http://127.0.0.1:{free_port()}"},
            "secret": "TOPSECRET-1234", "config_kwargs": {"retries": {"max_attempts": 1}}}
    cases = [(s3_server, f"s3://{bucket} holds 1 finished run folder(s) (demo-a): give one, e.g. memex report "
                         f"s3://{bucket}/demo-a"),
             (dead, f"cannot reach run folder s3://{bucket}/demo-a")]
    for options, line in cases:
        target = f"s3://{bucket}" if options is s3_server else f"s3://{bucket}/demo-a"
        monkeypatch.setattr(sys, "argv", ["memex", "report", target, "--storage-options", json.dumps(options)])
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = capsys.readouterr().err
        assert e.value.code == 1 and line in err and "Traceback" not in err and "TOPSECRET" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_the_trend_links_and_draws_an_audit_whose_tracker_failed_after_it_finished(monkeypatch):
    """A ledger row `error` with samples > 0 is an audit that finished, wrote its report, and then failed to
    log to its tracker: its counts were shown, but not its report link, and the chart left it out."""
    import datetime as dt

    from memex.layout import LEDGER_SCHEMA
    from memex.report import render_trend

    t = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    base = {k: None for k in LEDGER_SCHEMA.names} | {
        "series": "/runs/a", "base": "", "files_signature": "", "config_sha256": "a" * 64, "run": "r",
        "extracted_generations": 0, "flagged_prompts": 0, "started": t, "finished": t, "message": ""}
    rows = [base | {"location": "/runs/a/checkpoint-1000", "step": 1000, "weights_sha256": "w1", "samples": 8,
                    "extracted": 1, "outcome": "ok", "report": "r1/report/index.html"},
            base | {"location": "/runs/a/checkpoint-2000", "step": 2000, "weights_sha256": "w2", "samples": 8,
                    "extracted": 5, "outcome": "error", "message": "mlflow: no such run",
                    "report": "r2/report/index.html"},
            base | {"location": "/runs/a/checkpoint-3000", "step": 3000, "weights_sha256": "w3", "samples": 0,
                    "extracted": 0, "outcome": "error", "message": "CUDA out of memory", "report": ""}]
    import memex.report as report

    drawn, real = [], report.line_chart_svg
    monkeypatch.setattr(report, "line_chart_svg", lambda xs, ys, *a: drawn.append((xs, ys)) or real(xs, ys, *a))
    page = render_trend(pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA), lambda r: r["report"] or None)
    assert drawn[0][0] == [1000, 2000] and drawn[0][1]["training images extracted"] == [1, 5]
    # the next night's retry of step 2000 finished (ok): one point for the step, not two
    retry = rows[1] | {"outcome": "ok", "message": "", "finished": t + dt.timedelta(days=1)}
    drawn.clear()
    render_trend(pa.Table.from_pylist([*rows, retry], schema=LEDGER_SCHEMA), lambda r: r["report"] or None)
    assert drawn[0][0] == [1000, 2000]
    assert '<a href="r2/report/index.html">report</a>' in page and "r1/report/index.html" in page
    cells = page.split("checkpoint-3000</span></td>")[1].split("</tr>")[0]
    assert "report</a>" not in cells


def test_a_low_complexity_picture_short_of_min_generations_is_told_that_not_the_clique_rule():
    """count_pictures asks match.min_generations of every picture; a low-complexity one with 1 copying generation
    inside a flagged clique (demo: min 2) read "none in a flagged clique ...; needs 3" beside its own
    "in a clique 1", and "needs 3" where 2 would do. Its reason is now the count it lacks."""
    from memex.report import uncounted_reason

    t = {"min_generations": 2, "low_detail_min_generations": 3}
    one = {"picture": "sky", "generations": 1, "in_clique": 1, "low_complexity": True, "counted": False}
    assert uncounted_reason(one, t) == "1 copying generation(s); needs 2"
    two = {**one, "generations": 2, "in_clique": 0}  # past min_generations, short of the low-detail count
    assert uncounted_reason(two, t) == ("low complexity: 2 copying generation(s), none in a flagged clique or closer "
                                        "than its tile mosaic; needs 3")
