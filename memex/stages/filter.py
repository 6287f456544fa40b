"""Filter stage (needs no training data): flag the prompts whose generations collapse onto one image.

Per prompt: tiled l2 between all pairs of its generations (memex/distances.py), an edge where the
distance is <= filter.edge_threshold, and the largest clique (memex/cliques.py); the prompt is
flagged when the clique reaches filter.min_clique. 500 generations per prompt = 125k pairs: at
512 px that is ~0.3 s of distance math on a GPU and a few seconds on CPU; the clique search on the
500-node graph takes milliseconds unless the graph is adversarial (see the cliques module bound).

Work unit: a chunk of `filter.prompts_per_task` consecutive prompts, one Ray task each, written as
candidates/shard-<chunk>.parquet with a marker (the same resume rule as the samples). Why tasks
over prompt chunks rather than Ray Data `groupby("prompt_id").map_groups`: samples are written
prompt-major, so a chunk's samples sit in a few adjacent shard files that the task reads directly;
a groupby would shuffle every image byte across the cluster to rebuild groups that already exist.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from memex.config import AuditConfig, FilterConfig
from memex.layout import CANDIDATES_SCHEMA, SAMPLES_SCHEMA, RunLayout, StorageError

log = logging.getLogger("memex.filter")


def decode_png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # a writable copy (torch.from_numpy)


def filter_prompt(images: np.ndarray, f: FilterConfig, device: str = "cpu") -> tuple:
    """(N, H, W, 3) uint8 generations of one prompt -> (CliqueResult, representative index, (N,)
    tiled l2 of each generation to its nearest other one)."""
    import torch

    from memex.cliques import adjacency, largest_clique, representative
    from memex.distances import tiled_l2_pairwise, to_unit

    x = to_unit(torch.from_numpy(images)).to(device)
    d = tiled_l2_pairwise(x, x).cpu().numpy()  # (N, N), N = samples per prompt (500 in the paper)
    res = largest_clique(adjacency(d, f.edge_threshold), f.min_clique, f.max_expansions)
    off = d + np.diag(np.full(len(d), np.inf))  # a sample is not its own neighbour
    nearest = off.min(axis=1) if len(d) > 1 else np.full(len(d), np.nan)
    return res, representative(res.members, d), nearest


def filter_chunk_task(root: str, run_name: str, storage_options: dict, chunk: int, p0: int, p1: int,
                      samples_per_prompt: int, shard_size: int, f: FilterConfig, device: str) -> dict:
    """Filter prompts [p0, p1) of the run and write candidates/shard-<chunk>."""
    from memex.models import resolve_device

    layout = RunLayout(root, run_name, storage_options)
    if layout.is_complete("candidates", chunk):
        return {"chunk": chunk, "skipped": True}
    device = resolve_device(device)
    t0 = time.perf_counter()
    prompts = layout.read_prompts().slice(p0, p1 - p0)
    pids = prompts["prompt_id"].to_pylist()
    # Samples are prompt-major: prompts [p0, p1) are units [p0*n, p1*n), in these shard files only.
    first, last = p0 * samples_per_prompt // shard_size, (p1 * samples_per_prompt - 1) // shard_size
    paths = [layout.shard_path("samples", s) for s in range(first, last + 1)]
    samples = pq.ParquetDataset(paths, filesystem=layout.fs, schema=SAMPLES_SCHEMA).read(
        columns=["sample_id", "prompt_id", "sample_index", "image"])
    samples = samples.filter(pc.is_in(samples["prompt_id"], pa.array(pids))).sort_by(
        [("prompt_id", "ascending"), ("sample_index", "ascending")])
    rows = []
    for pid, text in zip(pids, prompts["prompt"].to_pylist()):
        mine = samples.filter(pc.equal(samples["prompt_id"], pid))
        sids = mine["sample_id"].to_pylist()
        images = np.stack([decode_png(b) for b in mine["image"].to_pylist()])
        res, rep, nearest = filter_prompt(images, f, device)
        rows.append({"prompt_id": pid, "prompt": text, "n_samples": len(sids), "clique_size": res.size,
                     "clique_upper_bound": res.upper_bound, "clique_exact": res.exact,
                     "flagged": res.size >= f.min_clique, "sample_ids": [sids[m] for m in res.members],
                     "representative": sids[rep], "nearest_distances": nearest.astype(np.float32).tolist()})
    table = pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA)
    layout.write_shard("candidates", chunk, table, {"seconds": round(time.perf_counter() - t0, 2)})
    return {"chunk": chunk, "flagged": int(sum(r["flagged"] for r in rows))}


def run(cfg: AuditConfig, run_name: str) -> pa.Table:
    """Filter every prompt of a generated run; returns the candidates table (one row per prompt)."""
    import ray

    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    if not layout.fs.exists(layout.join("samples", "_SUCCESS.json")):
        raise StorageError(f"run {layout.uri} has no complete samples/: run `memex generate` (or audit) first")
    layout.claim_stage("candidates", asdict(cfg.filter))
    n_prompts = layout.read_prompts().num_rows
    s, f, r = cfg.sampling, cfg.filter, cfg.resources
    chunks = [(c, p0, min(p0 + f.prompts_per_task, n_prompts))
              for c, p0 in enumerate(range(0, n_prompts, f.prompts_per_task))]
    todo = [c for c in chunks if not layout.is_complete("candidates", c[0])]
    if todo:
        if not ray.is_initialized():
            ray.init(address=r.address, log_to_driver=True)
        task = ray.remote(num_cpus=r.num_cpus, num_gpus=r.num_gpus)(filter_chunk_task)
        ray.get([task.remote(cfg.storage.root, run_name, cfg.storage.options, c, p0, p1, s.samples_per_prompt,
                             s.shard_size, f, r.device) for c, p0, p1 in todo])
    missing = [c for c, _, _ in chunks if not layout.is_complete("candidates", c)]
    if missing:
        raise StorageError(f"filter chunks {missing[:10]} did not complete; rerun the same command to resume")
    table = layout.read_stage("candidates")
    layout.write_json(layout.join("candidates", "_SUCCESS.json"),
                      {"prompts": table.num_rows, "flagged": int(pc.sum(table["flagged"]).as_py() or 0)})
    return table
