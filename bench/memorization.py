"""Does a trained checkpoint reproduce its duplicated training images more than single-copy ones?

    python bench/memorization.py demo/models/demo-text [--samples 8 --steps 50 --guidance 3]

Reads the checkpoint's own training_manifest.parquet (written by `memex train`). Text model: each
distinct training image is prompted with its caption `--samples` times. Unconditional model:
`--samples` x (number of distinct images) generations. A generation reproduces a training image
when their tiled l2 (memex/distances.py) is <= 0.15, the paper's threshold; for the text model
the nearest image over the whole training set is used, so a collapse onto the wrong logo does not
count. Prints, per number of copies in training, how many images were reproduced at least once
and the fraction of generations that reproduced them.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from memex.config import SamplingConfig
from memex.distances import tiled_l2_pairwise, to_unit
from memex.manifest import load_image
from memex.models import load_model
from memex.prompts import prompt_id
from memex.sampling import Sampler, sample_seed
from memex.training import MANIFEST_FILE

THRESHOLD = 0.15


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(2)

    table = pq.read_table(Path(a.model) / MANIFEST_FILE)
    distinct = {}
    for row in table.to_pylist():
        distinct.setdefault(row["source_id"], row)
    ids = list(distinct)
    train = to_unit(torch.from_numpy(np.stack([load_image(distinct[i]) for i in ids])))
    model = load_model(a.model)
    sampler = Sampler(model, SamplingConfig(num_inference_steps=a.steps, guidance_scale=a.guidance,
                                             batch_size=a.batch))
    if sampler.conditional:
        target = [k for k in range(len(ids)) for _ in range(a.samples)]
        texts = [distinct[ids[k]]["caption"] for k in target]
        pids = [prompt_id(t) for t in texts]
        seeds = [sample_seed(0, p, j % a.samples) for j, p in enumerate(pids)]
    else:
        n = a.samples * len(ids)
        target, texts, pids, seeds = None, [""] * n, ["uncond"] * n, [sample_seed(0, "uncond", j) for j in range(n)]
    gen = to_unit(torch.from_numpy(sampler.generate(pids, texts, seeds)))
    d = tiled_l2_pairwise(gen, train)  # (generations, distinct training images)
    nearest_d, nearest = d.min(dim=1)

    hits: dict[str, int] = defaultdict(int)
    for j in range(len(gen)):
        k = int(nearest[j])
        if nearest_d[j] <= THRESHOLD and (target is None or target[j] == k):
            hits[ids[k]] += 1
    by_copies: dict[int, list[str]] = defaultdict(list)
    for i in ids:
        by_copies[distinct[i]["copies"]].append(i)
    kind = "text (prompted with each image's caption)" if sampler.conditional else "unconditional"
    print(f"model={a.model} {kind}; {len(gen)} generations, {a.steps} steps, tiled l2 <= {THRESHOLD}")
    print(f"{'copies':>6} {'images':>6} {'reproduced':>10} {'gen. within':>11}")
    for c in sorted(by_copies, reverse=True):
        group = by_copies[c]
        n_rep = sum(hits[i] > 0 for i in group)
        frac = sum(hits[i] for i in group) / (len(group) * a.samples)
        print(f"{c:>6} {len(group):>6} {n_rep:>10} {frac:>10.1%}")


if __name__ == "__main__":
    main()
