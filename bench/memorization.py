"""Brute-force truth: which training pictures does a checkpoint really reproduce?

    python bench/memorization.py demo/models/demo-text [--samples 16 --steps 50 --guidance 3 --out truth.parquet]

Reads the checkpoint's own training_manifest.parquet (written by `memex train`). Text model: every
distinct training image is prompted with its caption `--samples` times; a caption that k pictures
share (the demo's captions are compositional: 240 distinct for 256 pictures) is prompted k x
`--samples` times with sample indices 0..k x samples - 1, so no two generations share a seed. Unconditional model:
`--samples` x (number of distinct images) generations. Every generation is compared with *every*
distinct training picture, exactly (no index, no embedding): its nearest picture by RMS pixel
distance, that RMS, and the tiled l2 (the paper's distance, memex/distances.py) to the nearest
picture by tiled l2.

A generation *copies* a picture when that picture is its exact nearest by RMS and by tiled l2
alike, the tiled l2 is <= 0.15 (every 1/16 of the image within the paper's threshold) and the RMS
over the whole image is <= --copy-rms (0.1 = 25/255 per pixel: a second, global standard; the
demo model's copies are blurred by ~0.04-0.1 RMS, so 0.05 would keep 2 of its 108 tiled-l2
copies). A picture is *reproduced* when at least --min-copies (2) generations copy it: a copy seen
once in thousands of generations is listed apart, not counted as something the checkpoint emits.
These are the truth that bench/audit_vs_truth.py and bench/threshold_sweep.py score against
(docs/method.md#6-headline-metric).
Seeds are memex's own (`sample_seed(0, prompt id, index)`, prompt id = the hash
of the caption) and the batch is the audit's (--batch 32, the demo's), so sample j of a caption
here is byte-identical to sample j of the same prompt in a `memex audit` on the same machine.

Prints, per number of copies in training, how many pictures are reproduced and the share of their
generations that copy them; `--out` writes one row per generation (PNG included) for the audit
comparison and threshold sweeps.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from memex.config import SamplingConfig
from memex.distances import l2_pairwise, tiled_l2_pairwise, to_unit
from memex.images import encode_png
from memex.manifest import load_image
from memex.models import load_model
from memex.prompts import prompt_id
from memex.sampling import Sampler, sample_seed
from memex.training import MANIFEST_FILE

COPY_RMS = 0.1
TILED = 0.15
MIN_COPIES = 2


def distinct_pictures(model: str) -> tuple[list[str], dict, np.ndarray]:
    """(ids, {id: manifest row, its caption under "caption"}, (P, R, R, C) uint8) of the checkpoint's
    distinct training pictures as it was trained on them: squashed to its resolution (a non-square
    picture crashed the stack, and compared at its own size it is no copy of anything), the caption from
    its data.caption_column, a list's first (memex_train.json's recipe)."""
    import json

    from memex.manifest import first_caption

    recipe = json.loads((Path(model) / "memex_train.json").read_text())["config"]
    r, col, opts = recipe["arch"]["resolution"], recipe["data"]["caption_column"], recipe["data"]["storage_options"]
    table = pq.read_table(Path(model) / MANIFEST_FILE)
    distinct: dict[str, dict] = {}
    for row in table.to_pylist():
        distinct.setdefault(row["source_id"], {**row, "caption": first_caption(row.get(col))})
    ids = list(distinct)
    return ids, distinct, np.stack([load_image(distinct[i], r, opts) for i in ids])


def prompted(captions: list[str], samples: int) -> tuple[list[int], list[str], list[str], list[int]]:
    """(picture index, caption, prompt id, sample index) of each generation: every picture's caption
    `samples` times. Sample indices run on per prompt: a caption that k pictures share gets indices
    0..k x samples - 1, not 0..samples - 1 k times (the same seeds: byte-identical generations, one
    copy counted k times)."""
    target = [k for k in range(len(captions)) for _ in range(samples)]
    texts = [captions[k] for k in target]
    pids = [prompt_id(t) for t in texts]
    seen: dict[str, int] = defaultdict(int)
    index = []
    for p in pids:
        index.append(seen[p])
        seen[p] += 1
    return target, texts, pids, index


def copy_labels(rms: torch.Tensor, tiled: torch.Tensor, copy_rms: float = COPY_RMS):
    """(generations, pictures) RMS and tiled l2 distances -> (is_copy, (RMS to the nearest picture, its
    index), (tiled l2 to the nearest, its index)). A generation copies a picture when that picture is its
    nearest by both distances, within RMS copy_rms and tiled l2 TILED."""
    rms_d, rms_k = rms.min(dim=1)
    tiled_d, tiled_k = tiled.min(dim=1)
    return (rms_d <= copy_rms) & (tiled_d <= TILED) & (rms_k == tiled_k), (rms_d, rms_k), (tiled_d, tiled_k)


def tables(ids: list[str], distinct: dict, prompted: list[str | None], nearest: list[str], is_copy: list[bool],
           samples: int, min_copies: int) -> None:
    """Per number of copies in training: pictures, how many are reproduced (copied by >= min_copies
    generations of any prompt), and the share of the group's own generations (prompted with its pictures'
    captions) that copy a picture of the caption they were prompted with. (That share counted copies of the
    group's pictures by any prompt over the group's own generations: other captions' copies inflated it.)
    Unconditional (no prompt to own a generation): the group's copies over its pictures x --samples, the
    generations it would get if each picture drew its equal share."""
    copies: dict[str, int] = defaultdict(int)
    own: dict[str, int] = defaultdict(int)  # prompted picture -> its generations copying a picture of its caption
    caption = {i: distinct[i]["caption"] for i in ids}
    for p, n, c in zip(prompted, nearest, is_copy):
        if c:
            copies[n] += 1
            if p is not None and caption[n] == caption[p]:
                own[p] += 1
    conditional = prompted[0] is not None
    by_copies: dict[int, list[str]] = defaultdict(list)
    for i in ids:
        by_copies[distinct[i]["copies"]].append(i)
    print(f"{'copies':>6} {'images':>6} {'reproduced':>10} {'gen. copying':>12}")  # copies: rows in training
    for c in sorted(by_copies, reverse=True):
        group = by_copies[c]
        n_rep = sum(copies.get(i, 0) >= min_copies for i in group)
        frac = (sum(own.get(i, 0) for i in group) / (len(group) * samples) if conditional
                else sum(copies.get(i, 0) for i in group) / (len(group) * samples))
        print(f"{c:>6} {len(group):>6} {n_rep:>10} {frac:>11.1%}")
    for what, keep in (("reproduced", lambda n: n >= min_copies), ("copied once", lambda n: n < min_copies)):
        print(f"{what}:", ", ".join(f"{i} ({distinct[i]['copies']} copies in training, {n} gen.)"
                                    for i, n in sorted(copies.items()) if keep(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--copy-rms", type=float, default=COPY_RMS)
    ap.add_argument("--min-copies", type=int, default=MIN_COPIES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write one row per generation here (Parquet)")
    ap.add_argument("--from", dest="pool", help="print the tables of a pool --out wrote before (no generation)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    if a.pool:
        ids, distinct, _ = distinct_pictures(a.model)
        t = pq.read_table(a.pool, columns=["prompted_id", "nearest_id", "copy"]).to_pylist()
        print(f"model={a.model}; {len(t)} generations of {a.pool}")
        return tables(ids, distinct, [r["prompted_id"] for r in t], [r["nearest_id"] for r in t],
                      [r["copy"] for r in t], len(t) // len(ids), a.min_copies)
    ids, distinct, train_u8 = distinct_pictures(a.model)
    train = to_unit(torch.from_numpy(train_u8))
    model = load_model(a.model)
    sampler = Sampler(model, SamplingConfig(num_inference_steps=a.steps, guidance_scale=a.guidance,
                                             batch_size=a.batch))
    if sampler.conditional:
        target, texts, pids, index = prompted([distinct[i]["caption"] for i in ids], a.samples)
    else:
        n = a.samples * len(ids)
        target, texts, pids, index = [-1] * n, [""] * n, ["uncond"] * n, list(range(n))
    seeds = [sample_seed(0, p, i) for p, i in zip(pids, index)]
    t0 = time.perf_counter()
    gen_u8 = sampler.generate(pids, texts, seeds)
    seconds = time.perf_counter() - t0
    gen = to_unit(torch.from_numpy(gen_u8))
    rms = l2_pairwise(gen, train)  # (generations, pictures): exact, every pair
    tiled = tiled_l2_pairwise(gen, train)
    is_copy, (rms_d, rms_k), (tiled_d, tiled_k) = copy_labels(rms, tiled, a.copy_rms)
    kind = "text (prompted with each picture's caption)" if sampler.conditional else "unconditional"
    print(f"model={a.model} {kind}; {len(gen)} generations in {seconds:.0f} s, {a.steps} steps, "
          f"copy = nearest picture at tiled l2 <= {TILED} and RMS <= {a.copy_rms}; "
          f"reproduced = >= {a.min_copies} copies")
    tables(ids, distinct, [ids[k] if k >= 0 else None for k in target], [ids[int(k)] for k in rms_k],
           is_copy.tolist(), a.samples, a.min_copies)
    if a.out:
        pq.write_table(pa.table({
            "prompt_id": pids, "prompt": texts, "sample_index": pa.array(index, pa.int32()),
            "seed": pa.array(seeds, pa.int64()),
            "prompted_id": [ids[k] if k >= 0 else None for k in target],
            "prompted_copies": pa.array([distinct[ids[k]]["copies"] if k >= 0 else None for k in target], pa.int32()),
            "nearest_id": [ids[int(k)] for k in rms_k], "nearest_rms": rms_d.numpy().astype(np.float32),
            "nearest_copies": pa.array([distinct[ids[int(k)]]["copies"] for k in rms_k], pa.int32()),
            "tiled_id": [ids[int(k)] for k in tiled_k], "tiled_l2": tiled_d.numpy().astype(np.float32),
            "copy": is_copy.numpy(),
            "image": [encode_png(g) for g in gen_u8],
        }), a.out, compression="zstd")
        print(f"wrote {a.out}: {len(gen)} rows")


if __name__ == "__main__":
    main()
