"""Match stage: join candidates with the training images they copy, and verify on pixels.

Driver (`run`):
  1. candidates: the samples of each flagged prompt's clique (match.candidates=cliques), or every
     sample (=all, the paper's unconditional setting);
  2. embed them in one Ray task (the embedder is the only model here; GPU when resources ask);
  3. one Ray task per index shard searches all candidates; the driver merges the top k
     (memex/index.py merge_topk: the same ids and order as one flat index over all vectors);
  4. fetch the pixels of every training image that appears in some top k (train.parquet);
  5. verify each candidate against its k nearest training images with match.distance: tiled l2
     <= 0.15 (Stable Diffusion style), or relative l2 <= 1 (alpha = 0.5, n = 50; small
     unconditional models); the best (smallest) distance is the candidate's match;
  6. write matches/ (one row per candidate) and matches/summary.json.
A candidate set is small (the paper: ~1,000s of clique members out of 175M generations), so
verification runs in the driver; the expensive parts (embedding, search) are Ray tasks.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memex.config import AuditConfig, CandidateSource, DistanceKind, plain
from memex.layout import MATCHED_TRAIN_SCHEMA, MATCHES_SCHEMA, RunLayout, StorageError
from memex.stages.filter import decode_png
from memex.models import resolve_device
from memex.stages.index import IndexInfo, _embedder_spec, fetch_train_rows, load_shards, search_all

log = logging.getLogger("memex.match")
REPORT_NEAR_MISSES = 200  # closest non-copies whose training images are kept for the report


def embed_task(images: list[bytes], emb, device: str) -> np.ndarray:
    from memex.embed import make_embedder
    from memex.manifest import resize_image

    embedder = make_embedder(_embedder_spec(emb, resolve_device(device)))
    return embedder(np.stack([resize_image(decode_png(b), emb.size) for b in images]))


def search_task(info: IndexInfo, storage_options: dict, shard: int, queries: np.ndarray, k: int, idx) -> tuple:
    (index,) = load_shards(info.layout(storage_options), [shard], storage_options)
    return search_all([index], queries, k, idx, info.metric)


def verify(gen: np.ndarray, neighbors: list[np.ndarray], kind: DistanceKind, alpha: float) -> np.ndarray:
    """Pixel distances of one generation (H, W, 3) uint8 to each of its neighbours -> (k,) float.

    tiled_l2: per neighbour, the paper's tiled l2 (each pair resized to their smaller common size).
    relative_l2: l2 to each neighbour divided by alpha x the mean l2 over all of them (the
    neighbours are the reference set S), so the minimum entry is the paper's d(x_hat, x).
    """
    import torch

    from memex.distances import l2_pairwise, tiled_l2, to_unit

    g = to_unit(torch.tensor(gen[None]))
    fn = tiled_l2 if kind == DistanceKind.tiled_l2 else (lambda a, b: l2_pairwise(a, b)[:, 0])
    d = np.array([float(fn(g, to_unit(torch.tensor(n[None])))[0]) for n in neighbors])  # tensor(): copies read-only arrays
    if kind == DistanceKind.relative_l2:
        denom = alpha * d.mean()
        d = np.where(denom > 0, d / max(denom, 1e-12), 0.0)  # all neighbours identical to x_hat: d = 0
    return d


def run(cfg: AuditConfig, run_name: str, info: IndexInfo, candidates: pa.Table) -> dict:
    import ray

    from memex.ingest import decode_rows

    m, opts, r = cfg.match, cfg.storage.options, cfg.resources
    layout = RunLayout(cfg.storage.root, run_name, opts)
    layout.claim_stage("matches", {"match": plain(m), "index_key": info.key, "embedder": plain(cfg.embedder)})
    summary_path = layout.summary_path
    if layout.is_complete("matches", 0) and layout.fs.exists(summary_path):
        return layout.read_json(summary_path)
    t0 = time.perf_counter()

    # 1. candidates
    if m.candidates == CandidateSource.cliques:
        flagged = candidates.filter(candidates["flagged"])
        wanted = [s for ids in flagged["sample_ids"].to_pylist() for s in ids]
    else:
        wanted = None
    samples = layout.read_stage("samples", columns=["sample_id", "prompt_id", "prompt", "image"])
    if wanted is not None:
        samples = samples.filter(pc.is_in(samples["sample_id"], pa.array(wanted, pa.string())))
    samples = samples.sort_by("sample_id")
    n = samples.num_rows
    log.info("match: %d candidates against %d indexed training images", n, info.n_indexed)

    rows: list[dict] = []
    pixels: dict[int, np.ndarray] = {}  # gid -> training image (H, W, 3) uint8, as verified
    if n:
        if not ray.is_initialized():
            ray.init(address=r.address, log_to_driver=True)
        # 2. embed, 3. search every shard, merge
        images = samples["image"].to_pylist()
        q = ray.get(ray.remote(num_cpus=r.num_cpus, num_gpus=r.num_gpus)(embed_task).remote(images, cfg.embedder,
                                                                                           r.device))
        k = min(max(m.k, m.n_neighbors if m.distance == DistanceKind.relative_l2 else m.k), info.n_indexed)
        search = ray.remote(num_cpus=r.num_cpus)(search_task)
        parts = ray.get([search.remote(info, opts, s, q, k, cfg.index) for s in range(len(info.shards))])
        from memex.index import merge_topk

        D, I = merge_topk(parts, k, info.metric)
        # 4. training pixels of every neighbour
        train = fetch_train_rows(info.layout(opts), [int(g) for g in np.unique(I) if g >= 0])
        dec = decode_rows(train, None, opts)
        gid_of = dict(zip(train["id"].to_pylist(), train["gid"].to_pylist()))
        pixels = {gid_of[i]: img for i, img in zip(dec.ids, dec.images)}
        meta = {g: (i, c) for g, i, c in zip(*(train[c].to_pylist() for c in ("gid", "id", "caption")))}
        # 5. verify on pixels
        for j, (sid, pid, text, png) in enumerate(zip(samples["sample_id"].to_pylist(), samples["prompt_id"].to_pylist(),
                                                       samples["prompt"].to_pylist(), images)):
            nb = [(rank, int(g)) for rank, g in enumerate(I[j]) if g >= 0 and int(g) in pixels]
            if not nb:
                continue
            d = verify(decode_png(png), [pixels[g] for _, g in nb], m.distance, m.alpha)
            # relative l2 normalises over all n neighbours, but only the first k are match candidates
            best = int(np.argmin(d[: m.k]))
            rank, g = nb[best]
            ed = float(D[j, rank])
            rows.append({"sample_id": sid, "prompt_id": pid, "prompt": text, "train_gid": g, "train_id": meta[g][0],
                         "train_caption": meta[g][1], "distance": float(d[best]),
                         "embed_distance": float(np.sqrt(max(ed, 0.0))) if info.metric == "l2" else ed,
                         "neighbor_rank": rank, "extracted": bool(d[best] <= m.threshold)})

    # 6. write: the matched training images first (the report shows them beside the generations)
    table = pa.Table.from_pylist(rows, schema=MATCHES_SCHEMA)
    # every extracted match, and the closest others up to REPORT_NEAR_MISSES (candidates=all verifies
    # every sample: 50k CIFAR-sized generations would otherwise copy 50k training images here)
    by_distance = sorted(rows, key=lambda r: r["distance"])
    keep = [r for r in by_distance if r["extracted"]] + [r for r in by_distance if not r["extracted"]][:REPORT_NEAR_MISSES]
    matched = sorted({r["train_gid"]: r["train_id"] for r in keep}.items())
    from memex.sampling import to_png

    layout.write_table(layout.matched_train_path, pa.Table.from_pylist(
        [{"train_gid": g, "train_id": i, "image": to_png(pixels[g])} for g, i in matched], schema=MATCHED_TRAIN_SCHEMA))
    layout.write_shard("matches", 0, table, {"seconds": round(time.perf_counter() - t0, 2)})
    summary = summarize(cfg, layout, info, candidates, table)
    layout.write_json(summary_path, summary)
    return summary


def summarize(cfg: AuditConfig, layout: RunLayout, info: IndexInfo, candidates: pa.Table, matches: pa.Table) -> dict:
    ext = matches.filter(matches["extracted"]) if matches.num_rows else matches
    per_prompt = []
    by_prompt: dict[str, list[dict]] = {}
    for row in ext.to_pylist():
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    for c in candidates.to_pylist():
        hits = by_prompt.get(c["prompt_id"], [])
        per_prompt.append({"prompt_id": c["prompt_id"], "prompt": c["prompt"], "flagged": c["flagged"],
                           "clique_size": c["clique_size"], "extracted_samples": len(hits),
                           "train_ids": sorted({h["train_id"] for h in hits})})
    n_samples = json.loads(layout.fs.cat_file(layout.join("samples", "_SUCCESS.json")))["rows"]
    train_ids = sorted(set(ext["train_id"].to_pylist())) if ext.num_rows else []
    return {
        "run": layout.uri,
        "model": {"name": cfg.model.name, "path": cfg.model.path},
        "samples": n_samples,
        "prompts": candidates.num_rows,
        "prompts_flagged": int(sum(candidates["flagged"].to_pylist())),
        "candidates_verified": matches.num_rows,
        "extracted_generations": ext.num_rows,
        "extracted_unique_train_images": len(train_ids),
        "extracted_train_ids": train_ids,
        "thresholds": {"filter_edge_tiled_l2": cfg.filter.edge_threshold, "min_clique": cfg.filter.min_clique,
                       "match_distance": cfg.match.distance.value, "match_threshold": cfg.match.threshold,
                       "match_k": cfg.match.k},
        "index": {"uri": info.layout(cfg.storage.options).uri, "key": info.key, "shards": len(info.shards),
                  "train_images": info.n_train, "indexed": info.n_indexed, "quarantined": info.n_quarantined},
        "per_prompt": per_prompt,
        "config": plain(cfg),
    }


def read_summary(layout: RunLayout) -> dict:
    s = layout.read_json(layout.summary_path)
    if s is None:
        raise StorageError(f"run {layout.uri} has no matches/summary.json: run `memex audit` to finish it")
    return s
