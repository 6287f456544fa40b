"""Sweep memex's thresholds against brute-force truth: precision and recall at each value.

    python bench/memorization.py demo/models/demo-text --samples 16 --out /tmp/truth-demo.parquet
    python bench/threshold_sweep.py --truth /tmp/truth-demo.parquet --model demo/models/demo-text

Input: a truth pool (bench/memorization.py --out): every generation with its exact nearest distinct
training picture by RMS, and whether it copies it (its `copy` column, bench/memorization.py copy_labels:
the nearest picture by RMS and by tiled l2, within RMS 0.1 and tiled l2 0.15). For
each threshold the script recomputes, on the same pool, exactly what memex would decide:

  match, tiled l2 (text models): a generation is called a copy of its nearest picture by tiled l2
      when that distance <= t. Precision: called copies that are true copies of that picture;
      recall: true copies called. Also per picture (what the summary counts). The pool's `copy` asks
      tiled l2 <= 0.15 itself, so against it recall reaches 1.0 at 0.15 by construction, and every
      call above 0.15 is a false alarm by definition: --truth-rms R defines a true copy by RMS alone
      (nearest picture within R), independent of the swept distance.
  match, relative l2 (unconditional models): l2 to the nearest picture / (alpha x mean l2 to the
      n = 50 nearest distinct pictures), called a copy at <= t (memex/distances.py).
  filter edge (text models): per prompt, the largest clique of its generations at tiled l2 <= t
      (memex/cliques.py), flagged at >= --min-clique members. A prompt is truly memorizing when one
      of its generations is a true copy. Precision and recall of flagged prompts.
Low-complexity pictures (tile detail below the match threshold, memex/distances.py) are reported
apart: the pixel distances call generations copies of them most easily.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memorization import distinct_pictures  # noqa: E402

from memex.cliques import adjacency, largest_clique  # noqa: E402
from memex.distances import l2_pairwise, relative_ratios, tile_detail, tiled_l2_pairwise, to_unit  # noqa: E402
from memex.images import decode  # noqa: E402


def pr(called: np.ndarray, true: np.ndarray) -> tuple[float, float, int]:
    tp = int((called & true).sum())
    return (tp / called.sum() if called.sum() else float("nan")), (tp / true.sum() if true.sum() else float("nan")), \
        int(called.sum())


def auc(pos: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; ties share ranks."""
    from scipy.stats import rankdata

    r = rankdata(score)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def triage_auc(a, t: list[dict], true: np.ndarray) -> None:
    """Wen et al.'s score of every caption (memex's triage: first step, --triage-seeds seeds) against
    the truth: a prompt is memorizing when one of its generations copies a training picture."""
    from memex.config import SamplingConfig
    from memex.models import load_model
    from memex.sampling import Sampler, sample_seed

    by_prompt: dict[str, list[int]] = defaultdict(list)
    for j, r in enumerate(t):
        by_prompt[r["prompt_id"]].append(j)
    pids = list(by_prompt)
    text = {r["prompt_id"]: r["prompt"] for r in t}
    sampler = Sampler(load_model(a.model), SamplingConfig(guidance_scale=a.guidance, batch_size=64))
    rows = [p for p in pids for _ in range(a.triage_seeds)]
    seeds = [sample_seed(1, p, j % a.triage_seeds) for j, p in enumerate(rows)]  # not the pool's noises (run seed 0)
    score = sampler.triage(rows, [text[p] for p in rows], seeds).reshape(len(pids), a.triage_seeds).mean(axis=1)
    mem = np.array([bool(true[by_prompt[p]].any()) for p in pids])
    own = np.array([t[by_prompt[p][0]]["prompted_copies"] > 1 for p in pids])
    print(f"\ntriage (noise_norm, first step, {a.triage_seeds} seeds): AUC {auc(mem, score):.3f} for the "
          f"{mem.sum()} prompts with a copying generation; AUC {auc(own, score):.3f} for the {own.sum()} captions "
          "of duplicated pictures")


def margin_sweep(t: list[dict], gen: torch.Tensor, train: torch.Tensor, ids: list[str], true: np.ndarray,
                 th: float = 0.15) -> None:
    """Among generations within tiled l2 `th` of their nearest picture, keep those whose nearest is
    at most r x the distance to the second-nearest distinct picture: a generation that merely looks
    like many training pictures (a generic logo, a flat background) sits at similar distances from
    several; a copy is far closer to one. Prints precision and recall per r, then the pictures
    called at r = 1 (no margin) with no true copy among their calls."""
    d = torch.cat([tiled_l2_pairwise(gen[i:i + 512], train) for i in range(0, len(gen), 512)])
    two = d.topk(2, dim=1, largest=False)
    d1, d2 = two.values[:, 0].numpy(), two.values[:, 1].numpy()
    k1 = two.indices[:, 0].numpy()
    ratio = d1 / np.maximum(d2, 1e-12)
    print(f"\nmatch: tiled l2 <= {th} and nearest <= r x second-nearest picture")
    copies = Counter(ids[k1[j]] for j in np.where(true)[0])
    reproduced = {q for q, c in copies.items() if c >= 2}  # as bench/audit_vs_truth.py counts them
    print(f"{'r':>5} {'precision':>9} {'recall':>6} {'called':>6} {'pictures':>8} {'pic. prec.':>10} "
          f"{'reproduced kept':>15}")
    for r in (0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 1.0):
        called = (d1 <= th) & (ratio <= r)
        p, rec, n = pr(called, true)
        pics = defaultdict(list)
        for j in np.where(called)[0]:
            pics[ids[k1[j]]].append(bool(true[j]))
        good = sum(any(v) for v in pics.values())
        print(f"{r:5.2f} {p:9.3f} {rec:6.3f} {n:6d} {len(pics):8d} {good / max(len(pics), 1):10.3f} "
              f"{len(reproduced & set(pics)):>9d} of {len(reproduced)}")
    called = d1 <= th
    for q in sorted({ids[k1[j]] for j in np.where(called)[0]}):
        js = [j for j in np.where(called)[0] if ids[k1[j]] == q]
        if not true[js].any():
            print(f"  no true copy: {q}: {len(js)} calls, tiled {d1[js].min():.3f}, ratio {ratio[js].min():.2f}, "
                  f"RMS {min(t[j]['nearest_rms'] for j in js):.3f}")
    tr = np.where(true)[0]
    print(f"  true copies: ratio median {np.median(ratio[tr]):.2f}, max {ratio[tr].max():.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--min-clique", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--n-neighbors", type=int, default=50)
    ap.add_argument("--triage-seeds", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--truth-rms", type=float, default=None,
                    help="a true copy by RMS alone: the generation's nearest picture within this RMS, tiled l2 not "
                         "asked (default: the pool's `copy`, which asks tiled l2 <= 0.15 too, so a tiled-l2 sweep "
                         "against it finds 0.15 by construction)")
    a = ap.parse_args()
    torch.set_num_threads(2)

    t = pq.read_table(a.truth).to_pylist()
    ids, _, train_u8 = distinct_pictures(a.model)
    train = to_unit(torch.from_numpy(train_u8))
    detail = dict(zip(ids, tile_detail(train).numpy()))
    gen = to_unit(torch.from_numpy(np.stack([decode(r["image"]) for r in t])))
    if a.truth_rms is None:
        true = np.array([r["copy"] for r in t])
        standard = "the pool's copy: nearest by RMS and tiled l2, RMS <= 0.1, tiled l2 <= 0.15"
    else:  # independent of the swept distance: RMS alone
        true = np.array([r["nearest_rms"] <= a.truth_rms for r in t])
        standard = f"RMS alone: the nearest picture within RMS {a.truth_rms} (tiled l2 not asked)"
    tiled = np.array([r["tiled_l2"] for r in t])
    same = np.array([r["tiled_id"] == r["nearest_id"] for r in t])  # tiled l2 and RMS agree on the picture
    conditional = t[0]["prompted_id"] is not None
    print(f"truth {a.truth}: {len(t)} generations, {true.sum()} true copies of "
          f"{len({r['nearest_id'] for r, c in zip(t, true) if c})} pictures; a true copy is {standard}")

    if conditional:
        print("\nmatch: tiled l2 <= t (generation called a copy of its nearest picture by tiled l2)")
        print(f"{'t':>5} {'precision':>9} {'recall':>6} {'called':>6} {'pictures':>8} {'pic. prec.':>10} "
              f"{'low-detail pictures':>19}")
        for th in (0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25):
            called = tiled <= th
            # right when it names the true copy's picture (tiled l2's nearest is RMS's); every true copy counts
            # for recall, also one whose tiled-l2 nearest is another picture (no threshold calls it right)
            p, _, n = pr(called, true & same)
            r = float((called & true & same).sum() / true.sum()) if true.sum() else float("nan")
            pics = defaultdict(list)
            for j in np.where(called)[0]:
                pics[t[j]["tiled_id"]].append(bool(true[j] and same[j]))
            good = sum(any(v) for v in pics.values())
            low = [q for q in pics if detail[q] < th]
            print(f"{th:5.3f} {p:9.3f} {r:6.3f} {n:6d} {len(pics):8d} {good / max(len(pics), 1):10.3f} "
                  f"{len(low):19d}")
    else:
        l2 = l2_pairwise(gen, train)  # (G, P): exact, every pair
        near = l2.topk(a.n_neighbors, dim=1, largest=False).values
        rel = relative_ratios(near.double(), a.alpha)[:, 0].numpy()
        print(f"\nmatch: relative l2 <= t (alpha {a.alpha}, n {a.n_neighbors} nearest distinct pictures)")
        print(f"{'t':>5} {'precision':>9} {'recall':>6} {'called':>6}")
        for th in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25):
            p, r, n = pr(rel <= th, true)
            print(f"{th:5.2f} {p:9.3f} {r:6.3f} {n:6d}")
        return

    margin_sweep(t, gen, train, ids, true & same)
    triage_auc(a, t, true)
    print(f"\nfilter: prompt flagged when >= {a.min_clique} of its generations form a clique at tiled l2 <= t")
    by_prompt = defaultdict(list)
    for j, r in enumerate(t):
        by_prompt[r["prompt_id"]].append(j)
    mem = {p: bool(true[js].any()) for p, js in by_prompt.items()}
    dists = {p: tiled_l2_pairwise(gen[js], gen[js]).numpy() for p, js in by_prompt.items()}
    print(f"{'t':>5} {'precision':>9} {'recall':>6} {'flagged':>7}  ({sum(mem.values())} memorizing prompts)")
    for th in (0.05, 0.1, 0.125, 0.15, 0.175, 0.2):
        flagged = np.array([largest_clique(adjacency(dists[p], th), a.min_clique, 200_000).size >= a.min_clique
                            for p in by_prompt])
        p, r, n = pr(flagged, np.array([mem[p] for p in by_prompt]))
        print(f"{th:5.3f} {p:9.3f} {r:6.3f} {n:7d}")


if __name__ == "__main__":
    main()
