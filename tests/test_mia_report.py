"""The membership-inference report (memex/mia_report.py): <run>/report/mia.html from a run folder
as `memex mia` leaves it, and the same section in the audit report only when the folder has one.

The run folder is planted: 60 members and 60 non-members whose loss separates them completely
(every member below every non-member: AUC 1), a SecMI score that is noise, no PIA (an all-null
column), and LiRA scores for the same images. Ids, captions, the model name and the settings carry
HTML/JS payloads: the page must show them as text and hold no element they would create.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest

from memex.layout import CANDIDATES_SCHEMA, MATCHES_SCHEMA, RunLayout
from memex.mia_metrics import member_score, roc_auc
from memex.mia_report import build_mia_report, render_mia_section
from memex.report import build_report, render_report
from memex.storage import StageFolder, StorageError, Store

from conftest import plant_run

N = 60  # members, and non-members
EVIL_ID = "<script>document.title='pwned'</script>"
EVIL_CAPTION = '<img src=x onerror="alert(1)"> a logo & "friends"'
SCORES_SCHEMA = pa.schema([("image_id", pa.string()), ("member", pa.bool_()), ("caption", pa.string()),
                           ("copies", pa.int32()), ("loss", pa.float32()), ("pia", pa.float32()),
                           ("secmi", pa.float32())])


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text outside tags."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def count(self, tag: str) -> int:
        return sum(t == tag for t, _ in self.tags)


def _tables() -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(3)
    member = np.r_[np.ones(N, bool), np.zeros(N, bool)]
    ids = [f"m{i:03d}" for i in range(N)] + [f"n{i:03d}" for i in range(N)]
    ids[0] = EVIL_ID  # a member: the loss attack names it (below every non-member)
    loss = np.r_[rng.uniform(0.01, 0.05, N), rng.uniform(0.5, 1.0, N)].astype(np.float32)
    scores = pa.Table.from_pydict({
        "image_id": ids, "member": member.tolist(),
        "caption": [EVIL_CAPTION] + [f"caption {i}" for i in range(1, 2 * N)],
        "copies": [(1 if i % 3 else 12) for i in range(N)] + [None] * N,
        "loss": loss, "pia": [None] * (2 * N), "secmi": rng.normal(size=2 * N).astype(np.float32)},
        schema=SCORES_SCHEMA)
    # LiRA rows in another order, for the same images: online separates, offline is noise
    order = rng.permutation(2 * N)
    lira = pa.table({"image_id": pa.array([ids[i] for i in order], pa.string()),
                     "lira_online": pa.array((member * 3.0 + rng.normal(size=2 * N))[order], pa.float32()),
                     "lira_offline": pa.array(rng.normal(size=2 * N)[order], pa.float32()),
                     "shadows_in": pa.array(np.full(2 * N, 2), pa.int32())})
    return scores, lira


def _attack(auc: float, resolved_01: bool = False) -> dict:
    return {"auc": auc, "tpr_at_1pct_fpr": 0.25, "tpr_at_0.1pct_fpr": 0.125, "resolved_1pct": True,
            "resolved_0.1pct": resolved_01, "balanced_accuracy": 0.75, "unet_evaluations_per_image": 16.0}


SUMMARY = {"run": "/runs/r", "model": f"tiny {EVIL_ID}", "members": N, "nonmembers": N, "quarantined": 0,
           "shadow_models": 4, "unet_evaluations": 9600, "seconds": 12.5,
           "settings": {"draws": 4, "note": EVIL_CAPTION},
           "attacks": {"secmi": _attack(0.51), "loss": _attack(1.0), "lira_online": _attack(0.97),
                       "lira_offline": _attack(0.49)},
           "by_copies": {"12": {"members": 20, "auc": {"loss": 1.0, "secmi": 0.55}},
                         "1": {"members": 40, "auc": {"loss": 1.0, "secmi": 0.5}}}}


def plant_mia(store: Store, summary: dict = SUMMARY, markers: bool = True) -> None:
    """mia/ as `memex mia` leaves it: scores in two shards (with markers, or plain Parquet files),
    lira.parquet, and summary.json written last."""
    scores, lira = _tables()
    folder = StageFolder(store, "mia/scores")
    for i, part in enumerate((scores.slice(0, 70), scores.slice(70))):
        if markers:
            folder.write_shard(i, part)
        else:
            store.write_table(folder.file(i), part)
    store.write_table(store.join("mia", "lira.parquet"), lira)
    store.write_json(store.join("mia", "summary.json"), summary)


def _section(html: str) -> str:
    """The section's text after its opening tag, up to the next <h2> or the end of the page."""
    return html.split('<h2 id="membership-inference">', 1)[1].split("<h2>", 1)[0].split("\n</body>", 1)[0]


def test_mia_page_is_self_contained_and_shows_every_attack(tmp_path):
    store = Store(str(tmp_path / "runs" / "r"))
    plant_mia(store)
    uri = build_mia_report(str(tmp_path / "runs" / "r"))
    assert uri == str(tmp_path / "runs" / "r" / "report" / "mia.html")
    html = (tmp_path / "runs" / "r" / "report" / "mia.html").read_text()
    assert not [p.name for p in (tmp_path / "runs" / "r" / "report").iterdir() if p.name != "mia.html"]  # no temp

    doc = Tags(html)
    # hostile ids, captions, model name and settings are text: no element made from them, nothing to run
    assert doc.count("script") == 0 and doc.count("img") == 0 and "<script" not in html and "<img" not in html
    text = "".join(doc.text)
    assert EVIL_ID in text and EVIL_CAPTION in text and f"tiny {EVIL_ID}" in text
    # nothing fetched: the CSP forbids it and no tag points outside the page
    assert "default-src 'none'" in html and doc.count("link") == 0
    assert not [a for _, attrs in doc.tags for k, a in attrs.items() if k in ("src", "href")]

    # one ROC figure, one polyline per attack with data (PIA's column is all null: none for it)
    assert doc.count("svg") == 1 and doc.count("polyline") == 4
    scores, lira = _tables()
    auc = roc_auc(member_score("secmi", scores["secmi"].to_numpy()), scores["member"].to_numpy())
    legend = re.findall(r"<text [^>]*>(\w+: AUC [\d.]+)</text>", html)
    # LiRA's rows are shuffled: joined to their labels by image id, any row order
    label = dict(zip(scores["image_id"].to_pylist(), scores["member"].to_pylist()))
    is_member = np.array([label[i] for i in lira["image_id"].to_pylist()])
    lira_auc = {a: roc_auc(member_score(a, lira[a].to_numpy()), is_member) for a in ("lira_online", "lira_offline")}
    assert legend == ["loss: AUC 1.000", f"secmi: AUC {auc:.3f}", f"lira_online: AUC {lira_auc['lira_online']:.3f}",
                      f"lira_offline: AUC {lira_auc['lira_offline']:.3f}"]
    assert lira_auc["lira_online"] > 0.9  # the planted signal: a misjoined column would be ~0.5

    # the headline table: one row per attack of the summary, in the fixed order, values as recorded
    head = html.split("<h3>Attacks</h3>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td>(\w+)</td><td class=num>([^<]*)</td><td class=num>([^<]*)</td>"
                      r"<td class=num>(.*?)</td><td class=num>([^<]*)</td><td class=num>([^<]*)</td></tr>", head)
    assert [r[0] for r in rows] == ["loss", "secmi", "lira_online", "lira_offline"]
    assert rows[0][1:3] == ("1.000", "0.250") and rows[0][4:] == ("0.750", "16")
    # 60 non-members cannot resolve 0.1% FPR: n/a, with the TPR that FPR 0 gave
    assert rows[0][3].startswith("n/a: fewer than 1,000 non-members") and "0.125 at FPR 0" in rows[0][3]

    # by copies: numeric order (1 before 12), one AUC column per attack
    copies = html.split("<h3>By copies in the training set</h3>", 1)[1].split("</table>", 1)[0]
    assert "<th>copies</th><th class=num>members</th><th class=num>AUC loss</th><th class=num>AUC secmi</th>" in copies
    assert re.findall(r"<tr><td>(\d+)</td><td class=num>(\d+)</td>", copies) == [("1", "40"), ("12", "20")]

    # every member is below every non-member on loss: all 60 named, 50 listed, escaped
    exposed = html.split("<h3>Members identified with no false positive</h3>", 1)[1].split("<h3>", 1)[0]
    assert "60 member(s) scored above every non-member" in exposed and "10 more" in exposed
    # the chance baseline: an attack ranking at random puts n1 / (n0 + 1) members above all n0 non-members
    # (60 / 61 for each attack with scores, set against that attack's own count)
    assert f"loss 60 (chance {60 / 61:,.1f}: {60 / (60 / 61):,.1f}x chance)" in exposed
    assert exposed.count("<tr>") == 1 + 50 and "&lt;script&gt;" in exposed
    assert "n0" not in exposed  # no non-member listed
    assert "fall to chance" in html and "optimistic" in html


def test_scores_without_markers_and_without_lira(tmp_path):
    """A scores folder of plain Parquet files (no _markers) is read as a dataset; without
    lira.parquet the LiRA rows of the summary stay in the table but get no curve."""
    store = Store(str(tmp_path / "r"))
    plant_mia(store, markers=False)
    (tmp_path / "r" / "mia" / "lira.parquet").unlink()
    html = open(build_mia_report(str(tmp_path / "r"))).read()
    assert Tags(html).count("polyline") == 2  # loss and secmi, from 120 rows of two unmarked files
    assert f"loss {N} members / {N} non-members" in html
    assert "<td>lira_online</td>" in html


def test_missing_summary_is_refused(tmp_path):
    store = Store(str(tmp_path / "r"))
    plant_mia(store)
    (tmp_path / "r" / "mia" / "summary.json").unlink()
    with pytest.raises(StorageError, match="no mia/summary.json"):
        build_mia_report(str(tmp_path / "r"))
    assert not (tmp_path / "r" / "report").exists()


def test_unresolved_missing_and_empty_values():
    scores, _ = _tables()
    summary = {"members": N, "nonmembers": N,
               "attacks": {"loss": {"auc": float("nan"), "tpr_at_1pct_fpr": 0.0, "resolved_1pct": False,
                                    "tpr_at_0.1pct_fpr": None, "resolved_0.1pct": False}}}
    html = render_mia_section(summary, scores.drop_columns(["loss", "secmi"]), None)
    row = html.split("<td>loss</td>", 1)[1].split("</tr>", 1)[0]
    assert row.count("n/a") == 5  # AUC NaN, both TPRs unresolved, no balanced accuracy, no cost
    assert "n/a: fewer than 100 non-members" in row and "n/a: fewer than 1,000 non-members" in row
    assert "<svg" not in html and "No ROC to draw" in html  # no attack column has a value
    assert "By copies" not in html and "Cost:" not in html
    assert "No attack scores any member above every non-member" in html
    # LiRA rows of members only (and of an image the scores lack): no curve for it rather than an error
    lira = pa.table({"image_id": ["m001", "m002", "unknown"], "lira_online": pa.array([1.0, 2.0, 3.0], pa.float32())})
    html = render_mia_section(summary, scores.drop_columns(["secmi"]), lira)
    assert html.count("<polyline") == 1 and "loss: AUC 1.000" in html and "lira_online: AUC" not in html


def _audit_summary() -> dict:
    return {"thresholds": {"min_clique": 10, "filter_edge_tiled_l2": 0.15, "match_distance": "tiled_l2",
                           "match_k": 10, "match_threshold": 0.15},
            "model": {"name": "m", "path": "/m"}, "run": "/r", "samples": 8, "prompts": 1, "prompts_flagged": 0,
            "candidates_verified": 0, "extracted_generations": 0, "extracted_unique_train_images": 0}


def _no_time(html: str) -> str:
    return re.sub(r"report built \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", html)


def test_audit_report_includes_the_section_only_with_mia_results(tmp_path):
    rng = np.random.default_rng(0)
    layout = plant_run(tmp_path / "runs", "planted", {"a prompt": [rng.integers(0, 256, (32, 32, 3), np.uint8)
                                                                   for _ in range(8)]})
    summary = _audit_summary()
    layout.store.write_json(layout.summary_path, summary)

    html = open(build_report(layout)).read()
    assert "Membership inference" not in html and "<polyline" not in html
    # exactly the report of an audit without mia (the section adds nothing when absent)
    before = render_report(summary, CANDIDATES_SCHEMA.empty_table(), MATCHES_SCHEMA.empty_table(), {}, {})
    assert _no_time(html) == _no_time(before)

    plant_mia(layout.store)
    html = open(build_report(str(layout.path))).read()
    assert html.count('<h2 id="membership-inference">Membership inference</h2>') == 1
    section = _section(html)
    assert Tags(section).count("svg") == 1 and Tags(section).count("polyline") == 4
    assert html.index("Membership inference") < html.index("<h2>Configuration</h2>")  # before the config
    assert "&lt;script&gt;" in section and "<script" not in html
    # the rest of the report is unchanged
    assert _no_time(html.replace(section, "").replace('<h2 id="membership-inference">', "")) == _no_time(before)
    # and `memex mia`'s own page carries the same section
    page = open(build_mia_report(str(layout.path))).read()
    assert _section(page).strip() == section.strip()
    assert RunLayout.at(str(layout.path)).read_summary() == summary


def test_summary_round_trip_keeps_string_copy_keys(tmp_path):
    """summary.json keys are strings: "10" sorts after "9" numerically, not as text."""
    by = {str(k): {"members": k, "auc": {"loss": 0.5}} for k in (10, 9, 100)}
    html = render_mia_section(json.loads(json.dumps({**SUMMARY, "by_copies": by})), _tables()[0], None)
    assert re.findall(r"<tr><td>(\d+)</td>", html.split("By copies", 1)[1]) == ["9", "10", "100"]


def test_questioned_images_are_listed_with_their_p_values_escaped():
    from memex.mia_report import render_mia_section

    scores = pa.table({"image_id": ["m", "n", "q"], "member": pa.array([True, False, None], pa.bool_()),
                       "caption": pa.array([None] * 3, pa.string()), "copies": pa.array([None] * 3, pa.int32()),
                       "loss": pa.array([0.1, 0.5, 0.2], pa.float32())})
    summary = {"attacks": {"loss": {"auc": 1.0}}, "members": 1, "nonmembers": 1,
               "queries": [{"image_id": "<b>q</b>", "p_value": {"loss": 0.5}}]}
    html = render_mia_section(summary, scores, None)
    assert "Questioned images" in html and "&lt;b&gt;q&lt;/b&gt;" in html and "<b>q</b>" not in html
    assert "Questioned images" not in render_mia_section({**summary, "queries": []}, scores, None)
    assert "q-value" not in html  # one image questioned: nothing to correct for
    two = [{"image_id": "a", "p_value": {"loss": 0.02}, "q_value": {"loss": 0.04}},
           {"image_id": "b", "p_value": {"loss": 0.5}, "q_value": {"loss": 0.5}}]
    html = render_mia_section({**summary, "queries": two}, scores, None)
    assert "q-value loss" in html and "Benjamini-Hochberg" in html


def test_members_above_every_non_member_are_set_against_chance():
    """With 40 members and 7 non-members, an attack that ranks at random still puts about 40 / 8 = 5
    members above every non-member: the page listed them as an attacker would name them, with no
    baseline. Now it says how many chance gives, and whether the attacks found more."""
    rng = np.random.default_rng(0)
    member = np.r_[np.ones(40, bool), np.zeros(7, bool)]

    def page(n_below: int) -> str:  # n_below members with a lower loss (higher member score) than any non-member
        loss = np.r_[rng.uniform(0.1, 0.2, n_below), rng.uniform(0.4, 0.9, 40 - n_below), rng.uniform(0.3, 0.35, 7)]
        scores = pa.table({"image_id": [f"i{k}" for k in range(47)], "member": member, "caption": [""] * 47,
                           "copies": pa.array([1] * 47, pa.int32()), "loss": loss.astype(np.float32)})
        html = render_mia_section({"members": 40, "nonmembers": 7, "attacks": {"loss": {"auc": 0.5}}}, scores, None)
        return html.split("<h3>Members identified with no false positive</h3>", 1)[1]

    few, many = page(3), page(20)
    assert "3 member(s) scored above every non-member" in few and "loss 3 (chance 5.0: no more than chance)" in few
    assert "20 member(s) scored above every non-member" in many and "loss 20 (chance 5.0: 4.0x chance)" in many


def test_attacks_that_name_the_same_members_are_each_set_against_their_own_chance():
    """loss, lira_online and lira_offline rank nearly alike (all from the same losses). Three such attacks
    each naming the same 4 of 256 members (4x chance each) were one union of 4 against the sum of
    three chances, 3.0: "no more than chance". Each attack is set against its own."""
    n = 256
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    loss = np.r_[np.full(4, 0.01), np.linspace(0.5, 0.9, n - 4), np.linspace(0.2, 0.95, n)].astype(np.float32)
    scores = pa.table({"image_id": [f"i{k}" for k in range(2 * n)], "member": member, "caption": [""] * (2 * n),
                       "copies": pa.array([1] * (2 * n), pa.int32()), "loss": loss, "pia": loss, "secmi": loss})
    html = render_mia_section({"members": n, "nonmembers": n, "attacks": {a: {"auc": 0.5} for a in
                                                                          ("loss", "pia", "secmi")}}, scores, None)
    part = html.split("<h3>Members identified with no false positive</h3>", 1)[1]
    assert "4 member(s) scored above every non-member" in part
    for a in ("loss", "pia", "secmi"):
        assert f"{a} 4 (chance 1.0: 4.0x chance)" in part, part[:600]
