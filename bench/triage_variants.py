"""Which cheap per-prompt score ranks memorizing prompts first? Triage variants against brute-force truth.

    python bench/memorization.py demo/models/demo-text --samples 16 --out /tmp/truth.parquet
    python bench/triage_variants.py --truth /tmp/truth.parquet --model demo/models/demo-text

For every distinct training caption of the checkpoint, three scores of the kind a triage stage could
afford (a few UNet calls a prompt), each against the truth's labels:

  noise_norm   Wen et al.: ||eps(x_t, c) - eps(x_t, "")|| at the first step, averaged over --seeds
               seeds (memex's triage, 2 x seeds UNet evaluations).
  agreement    --seeds previews of the prompt with a short DDIM schedule (--preview-steps), minus the
               median pairwise tiled l2 between them: a memorized prompt gives the same picture from
               different noises (the clique of Carlini et al., on a cheap schedule).
  nearest      minus the smallest tiled l2 from any preview to its nearest training picture, exactly
               (an audit has the training set indexed anyway).

The scores' noises come from run seed --score-seed (1): the truth pool is run seed 0, and previews
from its noises start where its first --seeds samples start, so a score would see its own label.

Labels: a prompt *memorizes* when one of its truth generations copies a training picture; it
*reproduces* when its generations copy one picture at least twice (--label-samples N: counted over
its first N truth generations). Prints AUC and TPR at the lowest FPR for each score and label, the
UNet evaluations per prompt, and each reproducing prompt's rank under every score.

First it prints a ceiling that needs no UNet call (`ceiling`): the truth's own generations split in
half, the first half's closest generation to a training picture as the score, the labels from the
second half. It says whether a prompt's memorization is a property a few samples can show at all.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memorization import distinct_pictures  # noqa: E402
from threshold_sweep import auc  # noqa: E402

from memex.config import SamplingConfig, SchedulerKind  # noqa: E402
from memex.distances import tiled_l2_pairwise, to_unit  # noqa: E402
from memex.models import load_model  # noqa: E402
from memex.sampling import Sampler, sample_seed  # noqa: E402


def tpr_at_zero_fpr(pos: np.ndarray, score: np.ndarray) -> float:
    """Share of positives scored above every negative."""
    return float((score[pos] > score[~pos].max()).mean()) if (~pos).any() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--preview-steps", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--preview-scheduler", default="ddim", choices=[k.value for k in SchedulerKind],
                    help="the previews' scheduler; 'default' is the checkpoint's own, the one generation uses")
    ap.add_argument("--label-samples", type=int, nargs="*", default=[],
                    help="also label each prompt from its first N truth generations only (label noise: 8 vs 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score-seed", type=int, default=1,
                    help="run seed of the scores' noises (sample_seed(run seed, prompt, j)); the truth pool's is 0, "
                         "so 0 scores the very noises its first --seeds samples start from (labels leak into scores)")
    ap.add_argument("--ceiling-only", action="store_true", help="print the split-half ceiling (no UNet) and stop")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    t = pq.read_table(a.truth, columns=["prompt_id", "prompt", "sample_index", "prompted_id", "nearest_id",
                                        "tiled_l2", "copy"]).to_pylist()
    pids, by_prompt, *_ = labels(t)
    ceiling(by_prompt)
    if a.ceiling_only:
        return
    text = [by_prompt[p][0]["prompt"] for p in pids]

    _, _, train_u8 = distinct_pictures(a.model)
    train = to_unit(torch.from_numpy(train_u8))
    model = load_model(a.model)
    rows = [p for p in pids for _ in range(a.seeds)]
    texts = [x for x in text for _ in range(a.seeds)]
    seeds = [sample_seed(a.score_seed, p, j % a.seeds) for j, p in enumerate(rows)]
    print(f"scores from run seed {a.score_seed}'s noises (the truth pool's: run seed 0)")
    scores: dict[str, tuple[np.ndarray, int]] = {}
    s = Sampler(model, SamplingConfig(guidance_scale=a.guidance, batch_size=64))
    scores["noise_norm (1 step)"] = (s.triage(rows, texts, seeds).reshape(len(pids), a.seeds).mean(1), 2 * a.seeds)
    for n in a.preview_steps:
        s = Sampler(model, SamplingConfig(guidance_scale=a.guidance, batch_size=64, num_inference_steps=n,
                                          scheduler=SchedulerKind(a.preview_scheduler)))
        prev = to_unit(torch.from_numpy(s.generate(rows, texts, seeds))).reshape(len(pids), a.seeds, *train.shape[1:])
        agree = np.array([-np.median(tiled_l2_pairwise(x, x).numpy()[np.triu_indices(a.seeds, 1)]) for x in prev])
        near = -tiled_l2_pairwise(prev.flatten(0, 1), train).min(dim=1).values.reshape(len(pids), a.seeds).min(1).values
        scores[f"agreement ({a.preview_scheduler} {n})"] = (agree, 2 * a.seeds * n)
        scores[f"nearest ({a.preview_scheduler} {n})"] = (near.numpy(), 2 * a.seeds * n)

    for n in [None, *a.label_samples]:
        _, by_prompt, memorizes, counts, reproduces = labels(t, n)
        print(f"labels from {'all' if n is None else f'the first {n}'} truth generations of each prompt: "
              f"{len(pids)} prompts; {memorizes.sum()} memorize (a copying generation), {reproduces.sum()} "
              "reproduce (one picture copied twice)")
        print(f"{'score':24} {'UNet/prompt':>11} {'AUC mem.':>8} {'AUC repr.':>9} {'TPR@0 mem.':>10} "
              f"{'TPR@0 repr.':>11}")
        for name, (sc, cost) in scores.items():
            print(f"{name:24} {cost:11d} {auc(memorizes, sc):8.3f} {auc(reproduces, sc):9.3f} "
                  f"{tpr_at_zero_fpr(memorizes, sc):10.3f} {tpr_at_zero_fpr(reproduces, sc):11.3f}")
        explain(pids, by_prompt, counts, reproduces, scores)


def ceiling(by_prompt: dict[str, list[dict]]) -> None:
    """How well can *any* per-prompt score from a few generations predict a prompt's other ones?
    Split each prompt's truth generations in half (sample index below / above the middle): the score is
    minus the smallest tiled l2 of the first half to its nearest picture (the `nearest` score on
    full 50-step samples instead of previews), the labels come from the second half only. A model
    whose copies are rare events per prompt (1-4 in 16) caps every triage AUC here, whatever it costs.
    `by_prompt`: {prompt id: all its truth rows}, as `labels` groups them."""
    score, mem_a, mem_b, rep_b = [], [], [], []
    for rows in by_prompt.values():
        half = (max(r["sample_index"] for r in rows) + 1) // 2
        first = [r for r in rows if r["sample_index"] < half]
        second = [r for r in rows if r["sample_index"] >= half]
        score.append(-min(r["tiled_l2"] for r in first))
        mem_a.append(any(r["copy"] for r in first))
        mem_b.append(any(r["copy"] for r in second))
        rep_b.append(max(copy_counts(second).values(), default=0) >= 2)
    score, mem_a, mem_b, rep_b = map(np.array, (score, mem_a, mem_b, rep_b))
    rep = f"{auc(rep_b, score):.3f} ({rep_b.sum()} prompts)" if 0 < rep_b.sum() < len(rep_b) else "n/a"
    print(f"split-half ceiling ({len(score)} prompts): the first half's closest generation as the score, labels from "
          f"the second half: AUC memorize {auc(mem_b, score):.3f} ({mem_b.sum()} prompts), reproduce {rep}; "
          f"P(second half memorizes | first half does) = {mem_b[mem_a].mean():.2f}, "
          f"| first half does not = {mem_b[~mem_a].mean():.2f}")


def copy_counts(rows: list[dict]) -> dict[str, int]:
    """{nearest picture: how many of these truth rows copy it}."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["nearest_id"]] += bool(r["copy"])
    return counts


def labels(t: list[dict], first: int | None = None) -> tuple:
    """(prompt ids sorted, {id: truth rows}, memorizes (P,), {picture: copies} per prompt, reproduces (P,))
    from the truth rows with sample_index < first (all when None)."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in t:
        if first is None or r["sample_index"] < first:
            by_prompt[r["prompt_id"]].append(r)
    pids = sorted(by_prompt)
    memorizes = np.array([any(r["copy"] for r in by_prompt[p]) for p in pids])
    counts = [copy_counts(by_prompt[p]) for p in pids]
    reproduces = np.array([max(c.values(), default=0) >= 2 for c in counts])
    return pids, by_prompt, memorizes, counts, reproduces


def explain(pids: list[str], by_prompt: dict, counts: list[dict], reproduces: np.ndarray, scores: dict) -> None:
    """Each reproducing prompt: what it copies, whether that picture is its own (a caption of the
    picture it copies) and its rank (1 = first) under every score, so a low AUC names its prompts."""
    ranks = {k: len(sc) - np.argsort(np.argsort(sc)) for k, (sc, _) in scores.items()}  # 1 = highest score
    print(f"reproducing prompts ({int(reproduces.sum())} of {len(pids)}); rank under each score above, in order:")
    for i in np.flatnonzero(reproduces):
        rows = by_prompt[pids[i]]
        pic, n = max(counts[i].items(), key=lambda kv: kv[1])
        own = "own picture" if pic in {r["prompted_id"] for r in rows} else "another's picture"
        print(f"  {rows[0]['prompt']!r}: copies {pic} x{n} of {len(rows)} ({own}); ranks "
              + " ".join(str(int(r[i])) for r in ranks.values()))


if __name__ == "__main__":
    main()
