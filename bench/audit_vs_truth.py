"""Audit strategies side by side against brute-force truth: recall, precision, UNet evaluations, time.

    python bench/memorization.py demo/models/demo-text --samples 16 --out /tmp/truth-demo.parquet
    python bench/audit_vs_truth.py --truth /tmp/truth-demo.parquet --model demo/models/demo-text \
        --strategy today --strategy default --strategy adaptive [--strategy paper] [--rematch 0.2]

Truth (bench/memorization.py): every training caption prompted --samples times, each generation's
exact nearest distinct training picture; a generation copies it at tiled l2 <= 0.15 and RMS <= 0.1
(nearest by both), and a picture is *reproduced* when at least 2 generations of the pool copy it.
Each strategy is a real `memex audit` (in this process, local Ray, a fresh storage root), composed
from conf/ with the strategy's overrides:

  today     the audit's defaults before issue 13: 24 prompts x 16 samples, clique filter, clique
            members verified (budget=fixed match.candidates=cliques triage=none)
  paper     the paper's fixed budget scaled to this machine: every caption x 16 samples, clique
            filter, clique members verified (4,096 generations: the truth pool's size)
  default   the shipped `memex audit`: triage, every generation matched, fixed budget (24 x 80 at 10 DDPM
            steps), a picture counted at 2 copying generations (conf/tune/audit_demo.yaml)
  default16 the shipped audit before "Fewer steps, more draws" (bench/RESULTS.md): 24 x 16 at the
            checkpoint's 50 steps, counted at 1 copying generation
  adaptive  default16 with budget=adaptive (rounds [4, 16]), Wen et al.'s free first-step triage
            (what `memex nightly` runs; every strategy but `default` samples as default16 does)
  preview   budget=adaptive with triage=preview: 8 previews x 10 DDIM steps a prompt, matched to
            the training index; a preview near a picture extends the prompt (`memex nightly`)
  ranked    every caption triaged by previews, the top 24 by preview distance get the fixed budget
            (prompts.limit=null triage=preview triage.keep=24): triage as prompt selection
  <name>@t   with --rematch t: that strategy's generations re-matched at match.threshold=t
            (run.samples_from: no UNet call; its UNet evaluations are the source's)

Scored against the truth:
  recall     reproduced pictures the audit reports / reproduced pictures (truth); `strict` (the
             column after it) credits one only when the audit's own evidence copies it (below)
  precision  reported pictures the checkpoint truly emits / reported pictures. A reported picture
             is truly emitted when the truth pool copies it at least once, or when one of the
             generations the audit counted for it copies it by the truth's standard (computed
             here on the run's own PNGs against every distinct picture: no index, no embedding).
             A false alarm is a picture that neither the pool nor the audit's own generations copy
             by that standard. `strict` counts only the second way (the audit's own evidence).
  triage AUC  the run's per-prompt triage scores against "the prompt's truth generations copy one
             picture at least twice" (over the run's prompts; `ranked` scores every caption)
Missed reproduced pictures are listed with how often the truth pool reproduced them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from memorization import COPY_RMS, MIN_COPIES, TILED, distinct_pictures  # noqa: E402
from threshold_sweep import auc  # noqa: E402

from memex.distances import l2_pairwise, tiled_l2_pairwise, to_unit  # noqa: E402
from memex.images import decode  # noqa: E402
from memex.layout import RunLayout  # noqa: E402

# every strategy but `default` keeps the sampling and counting it was measured with (bench/RESULTS.md): 16
# samples a prompt at the checkpoint's 50 steps, a picture counted at one copying generation
AT_16 = ["sampling.samples_per_prompt=16", "sampling.num_inference_steps=50", "match.min_generations=1"]
STRATEGIES = {
    "today": [*AT_16, "budget=fixed", "match.candidates=cliques", "triage=none"],
    "paper": [*AT_16, "budget=fixed", "match.candidates=cliques", "triage=none", "prompts.limit=null"],
    "default": [],  # the shipped defaults
    "default16": AT_16,
    "adaptive": [*AT_16, "budget=adaptive"],
    "preview": [*AT_16, "budget=adaptive", "triage=preview"],
    "ranked": [*AT_16, "prompts.limit=null", "triage=preview", "triage.keep=24"],
}


def reproducing_prompts(path: str) -> dict[str, bool]:
    """prompt id -> whether its truth generations copy one picture at least twice."""
    t = pq.read_table(path, columns=["prompt_id", "nearest_id", "copy"]).to_pylist()
    n = Counter((r["prompt_id"], r["nearest_id"]) for r in t if r["copy"])
    out = {r["prompt_id"]: False for r in t}
    for (pid, _), c in n.items():
        out[pid] |= c >= MIN_COPIES
    return out


def as_the_demo(model: str) -> list[str]:
    """The overrides that audit `model` as the demo is audited (its tuning, conf/tune/audit_demo.yaml): the
    strategies are the demo's. The demo's own folder under model=demo; another `memex train` model (the held-out
    second model) under model=local with tune=audit_demo, as model.path under model=demo is refused for users
    (memex/config.py check_demo_option): the same settings, the model's kind read from its folder."""
    from memex.config import demo_models

    if any(os.path.abspath(model) == os.path.abspath(d["path"]) for d in demo_models().values()):
        return [f"model.path={model}"]
    return ["model=local", f"model.path={model}", "tune=audit_demo"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from memex import cli

    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base=None):
        return cli.to_audit_config(hydra_compose(config_name="audit", overrides=overrides))


def truth_sets(path: str) -> tuple[Counter, Counter, int]:
    """(reproduced pictures: copying generations, pictures copied only once, pool size). A copy is
    recomputed from the pool's columns with this script's standard (memorization.py)."""
    t = pq.read_table(path, columns=["nearest_id", "nearest_rms", "tiled_id", "tiled_l2"]).to_pylist()
    n = Counter(r["nearest_id"] for r in t
                if r["nearest_rms"] <= COPY_RMS and r["tiled_l2"] <= TILED and r["tiled_id"] == r["nearest_id"])
    return (Counter({p: c for p, c in n.items() if c >= MIN_COPIES}),
            Counter({p: c for p, c in n.items() if c < MIN_COPIES}), len(t))


def true_copies(layout: RunLayout, summary: dict, ids: list[str], train: torch.Tensor) -> dict[str, bool]:
    """Per reported picture: does one of its counted generations copy it by the brute-force standard?"""
    m = layout.matches.read(columns=["sample_id", "train_id", "extracted"])
    m = m.filter(m["extracted"]).to_pylist()
    rows_of = {p["picture"]: set(p["rows"]) for p in summary["extracted_pictures"]}
    want = {r["sample_id"] for r in m if any(r["train_id"] in rows for rows in rows_of.values())}
    samples = layout.samples.read(columns=["sample_id", "image"]).to_pylist()
    png = {s["sample_id"]: s["image"] for s in samples if s["sample_id"] in want}
    ok = {p: False for p in rows_of}
    for r in m:
        pic = next((p for p, rows in rows_of.items() if r["train_id"] in rows), None)
        if pic is None or ok[pic]:
            continue
        g = to_unit(torch.from_numpy(decode(png[r["sample_id"]])[None]))
        d = l2_pairwise(g, train)[0]
        k = int(d.argmin())
        tiled = tiled_l2_pairwise(g, train)[0]  # the truth's rule: the nearest picture by RMS and by tiled l2 alike
        ok[pic] = bool(d[k] <= COPY_RMS) and ids[k] == pic and int(tiled.argmin()) == k and float(tiled[k]) <= TILED
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--model", default=str(REPO / "demo/models/demo-text"))
    ap.add_argument("--strategy", action="append", choices=list(STRATEGIES))
    ap.add_argument("--set", action="append", default=[], help="extra override for every strategy")
    ap.add_argument("--audit-seed", type=int, default=1,
                    help="the audits' sampling.seed. The truth pool is run seed 0's, so at 0 an audit's generations "
                         "are the pool's own (byte-identical): recall then asks whether it prompts the right captions "
                         "and agrees with brute force on those pixels, not whether its own draws find the copies")
    ap.add_argument("--rematch", type=float, action="append", default=[],
                    help="also re-match each strategy's generations at this match.threshold (run.samples_from)")
    ap.add_argument("--root", default=None, help="storage root (default: a fresh temp folder); an existing "
                    "one resumes its finished audits, so the wall time is then the resume's")
    a = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from memex.stages import audit

    reproduced, once, n_truth = truth_sets(a.truth)
    ids, distinct, train_u8 = distinct_pictures(a.model)
    train = to_unit(torch.from_numpy(train_u8))
    root = a.root or tempfile.mkdtemp(prefix="avt-")
    print(f"truth: {a.truth}: {n_truth} generations; {len(reproduced)} pictures reproduced "
          f"({', '.join(f'{p} x{n}' for p, n in sorted(reproduced.items()))}); "
          f"copied once: {', '.join(sorted(once))}")
    print(f"audits at sampling.seed={a.audit_seed} (the truth pool's noises are run seed 0's)")
    print(f"{'strategy':<12} {'recall':>7} {'strict':>6} {'precision':>9} {'strict':>6} {'found':>5} "
          f"{'UNet evals':>10} {'per found':>9} {'samples':>7} {'wall s':>7}")
    label = reproducing_prompts(a.truth)
    for name in a.strategy or ["today", "default", "adaptive"]:
        overrides = [*as_the_demo(a.model), f"storage.root={root}/{name}", f"sampling.seed={a.audit_seed}",
                     *STRATEGIES[name], *a.set]
        t0 = time.perf_counter()
        s = audit.run(compose(overrides))
        report(name, s, time.perf_counter() - t0, reproduced, once, distinct, ids, train, label)
        for t in a.rematch:
            # the same generations matched at another threshold (run.samples_from: no UNet call); the
            # UNet evaluations printed are the source's, which paid for the generations
            t0 = time.perf_counter()
            r = audit.run(compose([*overrides, f"run.samples_from={s['run']}", f"match.threshold={t}"]))
            report(f"{name}@{t}", r, time.perf_counter() - t0, reproduced, once, distinct, ids, train, label)


def score(found: set[str], ok: dict[str, bool], reproduced: set[str], once: set[str]) -> tuple:
    """(recall, strict recall, precision, strict, found reproduced pictures, found emitted pictures) of the
    pictures an audit reports, against the truth's reproduced and copied-once pictures; ok: per found picture,
    whether one of the audit's own counted generations copies it by the truth's standard (true_copies).
    Strict recall credits a reproduced picture only when the audit's own evidence for it is such a copy."""
    hit = found & reproduced
    recall = len(hit) / len(reproduced) if reproduced else float("nan")
    strict_recall = sum(ok[p] for p in hit) / len(reproduced) if reproduced else float("nan")
    emitted = {p for p in found if ok[p] or p in reproduced or p in once}
    precision = len(emitted) / len(found) if found else float("nan")
    strict = sum(ok[p] for p in found) / len(found) if found else float("nan")
    return recall, strict_recall, precision, strict, hit, emitted


def report(name: str, s: dict, wall: float, reproduced: Counter, once: Counter, distinct: dict,
           ids: list[str], train: torch.Tensor, label: dict[str, bool]) -> None:
    """One row of the table for a finished audit's summary, then what it missed and why."""
    layout = RunLayout.at(s["run"])
    found = {p["picture"] for p in s["extracted_pictures"]}
    ok = true_copies(layout, s, ids, train)
    recall, strict_recall, precision, strict, hit, emitted = score(found, ok, set(reproduced), set(once))
    per = s["unet_evaluations"] / len(hit) if hit else float("nan")
    print(f"{name:<12} {recall:7.3f} {strict_recall:6.3f} {precision:9.3f} {strict:6.3f} {len(found):5d} "
          f"{s['unet_evaluations']:10,d} "
          f"{per:9,.0f} {s['samples']:7d} {wall:7.0f}")
    missed = sorted(set(reproduced) - found)
    if missed:
        print("   missed: " + ", ".join(f"{p} ({distinct[p]['copies']} copies, truth x{reproduced[p]})"
                                       for p in missed))
    wrong = sorted(found - emitted)
    if wrong:
        print("   false alarms (no copy by the truth's standard, in the pool or the audit): " + ", ".join(wrong))
    loose = sorted(p for p in emitted if not ok[p])
    if loose:
        print("   emitted (the pool copies them), but the audit's own generations are looser copies: "
              + ", ".join(loose))
    extra = sorted(found - set(reproduced) - set(wrong))
    if extra:
        print("   reported, emitted, but copied fewer than 2 times in the pool: " + ", ".join(extra))
    uncounted = s.get("uncounted_pictures", [])
    if uncounted:
        why = lambda p: ("not distinct, margin %.2f" % p["margin"] if not p.get("distinct", True)  # noqa: E731
                         else "low complexity" if p.get("low_complexity") else "too few generations")
        print("   not counted: " + ", ".join(f'{p["picture"]} ({why(p)})' for p in uncounted))
    scored = [(label[p["prompt_id"]], p["triage_score"]) for p in s["per_prompt"]
              if p["triage_score"] is not None and p["prompt_id"] in label]
    if scored and 0 < sum(y for y, _ in scored) < len(scored):
        import numpy as np

        y, sc = np.array([y for y, _ in scored]), np.array([v for _, v in scored])
        print(f"   triage AUC {auc(y, sc):.3f} over {len(scored)} prompts ({int(y.sum())} reproduce); "
              f"triage {s.get('unet_evaluations_triage', 0):,} UNet evaluations")
    sampled = [p for p in s["per_prompt"] if p["samples"]]
    print(f"   {len(sampled)} prompts sampled; samples per prompt: "
          f"{dict(sorted(Counter(p['samples'] for p in sampled).items()))}")


if __name__ == "__main__":
    main()
