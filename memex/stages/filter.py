"""Filter stage (needs no training data): flag the prompts whose generations collapse onto one image.

Per prompt: tiled l2 between all pairs of its generations (memex/distances.py), an edge where the
distance is <= filter.edge_threshold, and the largest clique (memex/cliques.py); the prompt is
flagged when the clique reaches filter.min_clique. 500 generations per prompt = 125k pairs: at
512 px that is ~0.3 s of distance math on a GPU and a few seconds on CPU; the clique search on the
500-node graph takes milliseconds unless the graph is adversarial (see the cliques module bound).

    run(cfg, run_name) -> summary   candidates/ of a generated run (samples/ complete)

Work unit: a chunk of `filter.prompts_per_task` consecutive prompts, one Ray task each through
memex/runner.py, written as candidates/shard-<chunk>.parquet with a marker (the samples' rule). Why tasks
over prompt chunks rather than Ray Data `groupby("prompt_id").map_groups`: samples are written
prompt-major, so a chunk's samples sit in a few adjacent shard files that the task reads directly;
a groupby would shuffle every image byte across the cluster to rebuild groups that already exist.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from memex import runner
from memex.config import AuditConfig, FilterConfig
from memex.images import decode
from memex.layout import CANDIDATES_SCHEMA, SAMPLES_SCHEMA, RunLayout, StorageError
from memex.plan import SamplePlan
from memex.prompts import read_run_prompts

log = logging.getLogger("memex.filter")


RETRY_FACTOR = 10  # an undecided prompt is searched once more with 10x the budget (ms to seconds)


def undecided(size: int, upper_bound: int, exact: bool, min_clique: int) -> bool:
    """The clique search ran out of budget before it could tell whether a clique of min_clique exists."""
    return size < min_clique <= upper_bound and not exact


def filter_prompt(images: np.ndarray, f: FilterConfig, device: str = "cpu") -> tuple:
    """(N, H, W, C) uint8 generations of one prompt -> (CliqueResult, representative index, (N,)
    tiled l2 of each generation to its nearest other one)."""
    import torch

    from memex.cliques import adjacency, largest_clique, representative
    from memex.distances import tiled_l2_pairwise

    # uint8 in, converted block by block: 500 x 512^2 pairs in ~3.7 s and ~200 MiB beyond the
    # 393 MB of uint8 images (bench/bench_tiled_l2.py), instead of 1.5 GiB of float32 copies first
    x = torch.from_numpy(images).to(device)
    d = tiled_l2_pairwise(x, x).cpu().numpy()  # (N, N), N = samples per prompt (500 in the paper)
    adj = adjacency(d, f.edge_threshold)
    res = largest_clique(adj, f.min_clique, f.max_expansions)
    # adversarial graphs only: retry once, then report the prompt undecided
    if undecided(res.size, res.upper_bound, res.exact, f.min_clique):
        res = largest_clique(adj, f.min_clique, f.max_expansions * RETRY_FACTOR)
    off = d + np.diag(np.full(len(d), np.inf))  # a sample is not its own neighbour
    nearest = off.min(axis=1) if len(d) > 1 else np.full(len(d), np.nan)
    return res, representative(res.members, d), nearest


def prompt_samples(layout: RunLayout, plan: SamplePlan, p: int, pid: str) -> tuple[list[str], np.ndarray]:
    """The sample ids and (n, H, W, C) uint8 generations of prompt row p, in sample-index order.

    The plan (memex/plan.py) names the shards holding prompt p's samples, in every round; only
    those are read. One prompt at a time, decoded straight into one array: at the paper's 500 x
    512^2 that is ~200 MB of PNGs and 393 MB of pixels, not a chunk of prompts' worth (16 x that)."""
    t = layout.store.read_table([layout.samples.file(s) for s in plan.shards_of(p)], schema=SAMPLES_SCHEMA,
                                columns=["sample_id", "prompt_id", "sample_index", "image"],
                                filters=[("prompt_id", "=", pid)])
    # decoded in sample-index order through an index, not Table.sort_by: sorting copies every PNG
    order = np.argsort(t["sample_index"].to_numpy(), kind="stable")
    col = t["image"]
    head = decode(col[int(order[0])].as_py())
    images = np.empty((t.num_rows, *head.shape), np.uint8)
    images[0] = head
    for j in range(1, t.num_rows):
        images[j] = decode(col[int(order[j])].as_py())
    ids = t["sample_id"].take(order).to_pylist()
    del t, col
    # Arrow's allocator (mimalloc) keeps freed PNG buffers mapped unless asked; the pairwise
    # distances allocate next
    pa.default_memory_pool().release_unused()
    return ids, images


def filter_chunk(chunk: int, layout: RunLayout, p0: int, p1: int, f: FilterConfig, device: str,
                 prompt_ids: list[str] | None = None, texts: list[str] | None = None) -> pa.Table:
    """Unit `chunk`: prompts [p0, p1) of the run -> one CANDIDATES_SCHEMA row each (prompts the
    adaptive budget gave no sample have no row). prompt_ids, texts: those prompts' rows of prompts.parquet,
    handed over by run (which reads it once); read from the file when not given."""
    from memex.models import resolve_device

    device = resolve_device(device)
    if prompt_ids is None or texts is None:
        prompts = read_run_prompts(layout).slice(p0, p1 - p0)
        prompt_ids, texts = prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist()
    plan = SamplePlan.read(layout.generated)
    rows = []
    for p, pid, text in zip(range(p0, p1), prompt_ids, texts):
        if not plan.samples_of(p):
            continue
        sids, images = prompt_samples(layout, plan, p, pid)
        res, rep, nearest = filter_prompt(images, f, device)
        del images  # before the next prompt's are decoded
        rows.append({"prompt_id": pid, "prompt": text, "n_samples": len(sids), "clique_size": res.size,
                     "clique_upper_bound": res.upper_bound, "clique_exact": res.exact,
                     "flagged": res.size >= f.min_clique, "sample_ids": [sids[m] for m in res.members],
                     "representative": sids[rep], "nearest_distances": nearest.astype(np.float32).tolist()})
    return pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA)


def run(cfg: AuditConfig, run_name: str) -> dict:
    """Filter every prompt of a generated run; returns the summary written to candidates/_SUCCESS.json."""
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    if layout.samples.success() is None:
        raise StorageError(f"run {layout.uri} has no complete samples/: run `memex generate` (or audit) first")
    layout.candidates.claim(asdict(cfg.filter), f"run folder {layout.uri}")
    prompts = read_run_prompts(layout)
    n_prompts = prompts.num_rows
    ids, texts = prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist()
    del prompts
    f = cfg.filter
    # each unit is handed its prompts (~16 rows, a few KB): it read the whole of prompts.parquet to take them,
    # one file of a row group at the paper's 350,000 prompts, 21,875 units x ~6 MiB = 128 GiB read
    chunks = {c: {"p0": p0, "p1": (p1 := min(p0 + f.prompts_per_task, n_prompts)),
                  "prompt_ids": ids[p0:p1], "texts": texts[p0:p1]}
              for c, p0 in enumerate(range(0, n_prompts, f.prompts_per_task))}
    runner.run_tasks(layout.candidates, chunks, filter_chunk, cfg.resources, layout=layout, f=f,
                     device=cfg.resources.device)
    summary = summarize_candidates(layout.candidates.read(columns=SUMMARY_COLUMNS), f)  # not the distances
    layout.candidates.mark_success(summary)
    return summary


SUMMARY_COLUMNS = ["prompt_id", "flagged", "clique_size", "clique_upper_bound", "clique_exact"]


def summarize_candidates(candidates: pa.Table, f: FilterConfig) -> dict:
    """candidates/_SUCCESS.json: prompts, flagged, and the undecided ones (logged: they need a budget)."""
    rows = candidates.select(SUMMARY_COLUMNS).to_pylist()
    open_ids = [r["prompt_id"] for r in rows
                if undecided(r["clique_size"], r["clique_upper_bound"], r["clique_exact"], f.min_clique)]
    if open_ids:
        log.warning("%d prompts undecided: the clique search ran out of filter.max_expansions=%d (and %dx that) "
                    "before it could rule out a clique of %d; raise filter.max_expansions to decide them",
                    len(open_ids), f.max_expansions, RETRY_FACTOR, f.min_clique)
    return {"prompts": len(rows), "flagged": sum(bool(r["flagged"]) for r in rows), "undecided": len(open_ids),
            "undecided_prompt_ids": open_ids}
