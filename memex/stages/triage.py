"""Triage stage: a memorization score for every prompt, for a few UNet calls each.

    run(cfg, run_name) -> summary   triage/ of a prepared run: one row per prompt of prompts.parquet

Wen et al. ("Detecting, Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024;
docs/method.md#2-triage): a memorized prompt pulls the noise prediction far from the unconditional
one, so ||eps(x_t, prompt) - eps(x_t, "")|| over the first step(s) ranks memorized prompts first
(published: AUC 0.96 from one step on Stable Diffusion). memex averages it over `triage.seeds`
starting noises, which are samples 0..seeds-1 of the prompt (the same seeds generation uses), and
`triage.steps` steps: seeds x steps x 2 UNet evaluations per prompt against 500 x 50 x 2 for the
paper's generations. The score is RMS per latent value (memex/sampling.py noise_norm).

triage=preview asks the model directly: `triage.seeds` previews of a short DDIM schedule
(`triage.steps`, 10 in conf/triage/preview.yaml), each matched to the training index as the match
stage matches a generation (embedding search for match.k proposals, tiled l2 on pixels). A prompt's
score is minus the smallest tiled l2 of its previews: a memorizing prompt's previews already land
near the picture it copies. 8 previews x 10 steps x 2 = 160 UNet evaluations a prompt, a tenth of a
16-sample prompt; on the demo it ranks reproducing prompts at AUC 0.87-0.94 over three preview seeds
(mean 0.91) where noise_norm reaches 0.79-0.80 (scored from noises the truth pool never used:
bench/RESULTS.md), and the
adaptive budget extends a prompt whose preview came within budget.continue_factor x match.threshold
(memex/stages/audit.py continuing_prompts).

Units: chunks of `triage.prompts_per_task` prompts through the actor pool (one model per actor),
like generation; the runner writes triage/shard-<chunk>.parquet and its marker. triage=preview:
the actor pool writes previews/shard-<chunk> (the pixels, kept for the record), then a unit per
chunk in the driver matches them (embedding and search are Ray tasks, memex/stages/match.py) and
writes triage/shard-<chunk>.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import numpy as np
import pyarrow as pa

from memex import runner
from memex.config import AuditConfig, BudgetKind, DistanceKind, PromptSource, SchedulerKind, TriageConfig, TriageKind
from memex.layout import PREVIEWS_SCHEMA, TRIAGE_SCHEMA, RunLayout, StorageError
from memex.plan import tie_shard_size
from memex.prompts import read_run_prompts
from memex.stages.generate import RunSampler, unet_work

log = logging.getLogger("memex.triage")


def preview_config(cfg: AuditConfig) -> AuditConfig:
    """triage=preview samples with the run's guidance and size on its own short DDIM schedule."""
    return replace(cfg, sampling=replace(cfg.sampling, scheduler=SchedulerKind.ddim,
                                         num_inference_steps=cfg.triage.steps))


class TriagePrompts(RunSampler):
    """The worker of the actor pool: one model per actor (RunSampler); each call scores one chunk of
    prompts (noise_norm) or generates its previews (preview)."""

    def __init__(self, cfg: AuditConfig, run_name: str):
        super().__init__(preview_config(cfg) if cfg.triage.kind == TriageKind.preview else cfg, run_name)

    def __call__(self, index: int, p0: int, p1: int) -> tuple[pa.Table, dict]:
        """Prompts [p0, p1) -> one TRIAGE_SCHEMA row each (noise_norm) or triage.seeds PREVIEWS_SCHEMA
        rows each (preview), and the UNet evaluations they took."""
        from memex.images import encode_png
        from memex.sampling import sample_seed

        t, s = self.cfg.triage, self.cfg.sampling
        ids, texts = self.prompt_ids[p0:p1], self.prompts[p0:p1]
        rows_ids = [pid for pid in ids for _ in range(t.seeds)]  # prompt-major: seeds of one prompt together
        rows_texts = [p for p in texts for _ in range(t.seeds)]
        index_of = [j % t.seeds for j in range(len(rows_ids))]
        seeds = [sample_seed(s.seed, pid, i) for pid, i in zip(rows_ids, index_of)]
        before, padded = self.sampler.unet_evaluations, self.sampler.padded_evaluations
        if t.kind == TriageKind.preview:
            # a shard's worth of whole batches at a time: 256 prompts x 8 previews at 512 px would be
            # 1.6 GB of pixels at once. Their PNGs are only 1.2-1.9x smaller at level 1 (~420 kB a real
            # generation, ~630 kB a noise-like one, against 786 kB raw): 0.9-1.3 GB a chunk. So each step's
            # PNGs go into Arrow as soon as they are encoded, and their Python bytes are dropped; the column
            # is the steps' arrays as one ChunkedArray (no copy). The chunk's bytes kept in a list for one
            # pa.table were held twice, plus the copy's buffer growing by doubling: a peak of 3.0x the PNGs
            # above the actor's start, against 1.1x now (bench/bench_preview_memory.py, RESULTS.md).
            step, parts = tie_shard_size(s.shard_size, s.batch_size), []
            for j in range(0, len(rows_ids), step):
                images = self.sampler.generate(rows_ids[j:j + step], rows_texts[j:j + step], seeds[j:j + step])
                # images: (step, H, W, C) uint8, dropped before the next step's are sampled beside them
                parts.append(pa.array([encode_png(x, s.png_compress_level) for x in images], pa.binary()))
                del images
            table = pa.table({"prompt_id": rows_ids, "prompt": rows_texts, "sample_index": index_of,
                              "image": pa.chunked_array(parts, pa.binary())}, schema=PREVIEWS_SCHEMA)
            return table, self._cost(before, padded)
        scores = self.sampler.triage(rows_ids, rows_texts, seeds, t.steps).reshape(len(ids), t.seeds).mean(axis=1)
        table = pa.table({"prompt_id": ids, "prompt": texts, "score": scores.astype(np.float32),
                          "unet_evaluations": [t.seeds * t.steps * 2] * len(ids), "distance": [None] * len(ids),
                          "train_gid": [None] * len(ids)}, schema=TRIAGE_SCHEMA)
        return table, self._cost(before, padded)

    def _cost(self, before: int, padded: int) -> dict:
        # the chunk's UNet work, and the part spent on the rows padding its last batch (summary.json's
        # unet_evaluations_padding counts them beside generation's)
        return {"unet_evaluations": self.sampler.unet_evaluations - before,
                "padded_evaluations": self.sampler.padded_evaluations - padded}


def score_previews(index: int, cfg: AuditConfig, layout: RunLayout, info, nearest: Callable) -> tuple[pa.Table, dict]:
    """triage=preview, one chunk in the driver: previews/shard-<index> -> one TRIAGE_SCHEMA row per
    prompt. Each preview's match.k nearest training images by embedding (the match stage's search),
    then exact tiled l2 on pixels; a prompt's distance is its closest preview's. Memory: one chunk's
    previews as PNGs, sampling.shard_size previews' neighbours (encoded: match.TrainPixels) at a time, and
    resources.pixel_cache_mb of them cut for comparison."""
    from memex.images import decode, is_grayscale
    from memex.stages.match import _WARNED, Compared, Luma, fetch_training_images, pixel_distances, pixels_for, readable

    _WARNED.clear()  # each chunk's log names its unreadable neighbours (see match_shards)

    prev = layout.store.read_table(layout.previews.file(index))
    marker = layout.previews.read_marker(index) or {}
    cost = marker.get("unet_evaluations", 0)
    k = min(cfg.match.k, info.n_indexed)
    best: dict[str, tuple[float, int]] = {}  # prompt id -> (distance, gid) of its closest preview
    step = cfg.sampling.shard_size  # previews per search, like a samples shard: shard_size x k training images
    # a prompt's previews share neighbours: each cut once
    compared = Compared(cfg.trainset.preprocess.value, cfg.resources.pixel_cache_mb << 20)
    for j0 in range(0, prev.num_rows, step):
        part = prev.slice(j0, step)
        _, I = nearest(part["image"].to_pylist(), k)
        pixels, _ = fetch_training_images(info, I, cfg.storage.options)
        luma = Luma(pixels)  # a grayscale model's previews against colour pictures: their luma, as match does
        for j, (pid, png) in enumerate(zip(part["prompt_id"].to_pylist(), part["image"].to_pylist())):
            gray = is_grayscale(png)
            px, gen = luma if gray else pixels, decode(png)
            # (a huge neighbour decoded no larger than the comparison needs, as match does: pixels_for)
            nb, cut = readable(I[j], lambda g: compared.get(g, gray, lambda: pixels_for(px, g, gen.shape[:2]),
                                                            gen.shape[:2]))
            if not nb:
                continue
            d = pixel_distances(gen, cut, DistanceKind.tiled_l2, cfg.trainset.preprocess.value)
            if pid not in best or d.min() < best[pid][0]:
                best[pid] = (float(d.min()), nb[int(np.argmin(d))][1])
    ids = list(dict.fromkeys(prev["prompt_id"].to_pylist()))  # the chunk's prompts, in order
    texts = dict(zip(prev["prompt_id"].to_pylist(), prev["prompt"].to_pylist()))
    dist = [best.get(p, (None, None))[0] for p in ids]
    table = pa.table({"prompt_id": ids, "prompt": [texts[p] for p in ids],
                      "score": [None if d is None else -d for d in dist],
                      "unet_evaluations": [cost // max(len(ids), 1)] * len(ids), "distance": dist,
                      "train_gid": [best.get(p, (None, None))[1] for p in ids]}, schema=TRIAGE_SCHEMA)
    return table, {"unet_evaluations": cost, "padded_evaluations": marker.get("padded_evaluations", 0)}


def run(cfg: AuditConfig, run_name: str) -> dict:
    """Score every prompt of a prepared run; returns the summary written to triage/_SUCCESS.json."""
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    if not layout.store.exists(layout.prompts_path):
        raise StorageError(f"{layout.uri} is not a prepared run folder (no prompts.parquet): call generate.prepare")
    t = cfg.triage
    preview = t.kind == TriageKind.preview
    settings = {"seeds": t.seeds, "steps": t.steps}
    if t.prompts_per_task != TriageConfig.prompts_per_task:
        # the unit of resume: chunk c is prompts [c*step, (c+1)*step), so a resume with another step would
        # take old chunks' markers for new ranges (prompts left unscored, or scored twice). Left out at
        # the default, so run folders triaged before it was recorded resume.
        settings["prompts_per_task"] = t.prompts_per_task
    scored, info = {}, None
    if preview:  # noise_norm's settings as before: run folders triaged before previews existed resume
        from memex.config import plain
        from memex.membership import read_info
        from memex.redact import redact

        settings = {"kind": t.kind.value, **settings, "match_k": cfg.match.k}
        # previews/ is its own folder: deleting triage/ to redo it with other settings must not reuse it
        layout.previews.claim({"triage": settings}, f"run folder {layout.uri}")
        # the previews' distances are to the index's pictures, proposed by the embedder: a rerun against
        # another index (trainset.alpha=drop, other training images) reused distances to the old one,
        # as matches/ refuses (its index_key). The previews themselves stand: deleting triage/ rescores them.
        info = read_info(layout)
        scored = redact({"index_key": info.key, "embedder": plain(cfg.embedder)})
    # a folder triaged before the index was recorded adopts it (as it was), so it still resumes
    layout.triage.claim({"triage": settings, **scored}, f"run folder {layout.uri}", added=("index_key", "embedder"))
    n = read_run_prompts(layout).num_rows
    step = t.prompts_per_task
    chunks = {c: {"p0": p0, "p1": min(p0 + step, n)} for c, p0 in enumerate(range(0, n, step))}
    work = {"cfg": cfg, "run_name": run_name}
    if preview:
        from memex.stages.nearest import Neighbours

        runner.run_actor_pool(layout.previews, chunks, TriagePrompts, work, cfg.resources)
        with Neighbours(cfg, info, label="triage", store=layout.store) as nearest:  # loaded once, at the first chunk
            runner.run_here(layout.triage, {c: {} for c in chunks}, score_previews, cfg=cfg, layout=layout,
                            info=info, nearest=nearest)
    else:
        runner.run_actor_pool(layout.triage, chunks, TriagePrompts, work, cfg.resources)
    scores = layout.triage.read(columns=["score"])["score"].drop_null().to_numpy()
    scores = scores[np.isfinite(scores)]  # a NaN score (fp16 overflow) is no score: it made the median NaN
    summary = {"prompts": n, **unet_work(layout.triage),
               "score_median": float(np.median(scores)) if len(scores) else None,
               "score_mad": float(np.median(np.abs(scores - np.median(scores)))) if len(scores) else None}
    layout.triage.mark_success(summary)
    return summary


def triage_on(cfg: AuditConfig) -> bool:
    """triage=auto scores prompts whenever there are prompts (text models); none never."""
    return cfg.triage.kind != TriageKind.none and cfg.prompts.source != PromptSource.none


def needs_stage(cfg: AuditConfig) -> bool:
    """Whether the scores must be computed before generation, by this stage: always for triage=preview
    (its previews are not the run's samples). Guided generation
    computes every sample's first-step score for free (memex/sampling.py generate_scored), and a
    prompt's samples 0..seeds-1 start from the triage's own seeds: with triage.steps=1 and every
    prompt's first round holding >= triage.seeds samples, the samples give the same scores and the
    stage's 2 x seeds UNet evaluations a prompt are saved (192 on the demo audit). The stage runs when
    triage.keep ranks prompts before any generation, for more than one step, or without guidance."""
    t, s = cfg.triage, cfg.sampling
    first = cfg.budget.rounds[0] if cfg.budget.kind == BudgetKind.adaptive else s.samples_per_prompt
    return triage_on(cfg) and (t.kind == TriageKind.preview or t.keep is not None or t.steps > 1
                               or s.guidance_scale <= 1 or first < t.seeds)


def prompt_scores(cfg: AuditConfig, layout: RunLayout) -> dict[str, float]:
    """prompt id -> triage score: from triage/ when the stage ran, else the mean first-step score of
    each prompt's samples 0..triage.seeds-1 generated so far (needs_stage). Empty when triage is off."""
    if not triage_on(cfg):
        return {}
    # triage/ only when this config runs the stage (whose settings claim refuses other ones): one left by an
    # earlier audit of the folder with other settings (a refused triage=preview rerun) was read as this one's
    if needs_stage(cfg) and layout.triage.success() is not None:
        return {r["prompt_id"]: r["score"] for r in layout.triage.read(columns=["prompt_id", "score"]).to_pylist()
                if r["score"] is not None and np.isfinite(r["score"])}
    t = layout.samples.read(columns=["prompt_id", "triage_score"], filters=[("sample_index", "<", cfg.triage.seeds)])
    by: dict[str, list[float]] = {}
    for pid, sc in zip(t["prompt_id"].to_pylist(), t["triage_score"].to_pylist()):
        if sc is not None:
            by.setdefault(pid, []).append(sc)
    # finite only: a NaN first step (fp16 UNet outputs) is no score, as a missing one (ranked last)
    return {pid: m for pid, v in by.items() if np.isfinite(m := float(np.mean(v)))}


def preview_distances(cfg: AuditConfig, layout: RunLayout) -> dict[str, float]:
    """prompt id -> its closest preview's tiled l2 to the training set (triage=preview); empty otherwise,
    also when triage/ holds another triage's previews (see prompt_scores)."""
    if not (triage_on(cfg) and cfg.triage.kind == TriageKind.preview) or layout.triage.success() is None:
        return {}
    t = layout.triage.read(columns=["prompt_id", "distance"])
    return {p: d for p, d in zip(t["prompt_id"].to_pylist(), t["distance"].to_pylist()) if d is not None}


def robust_z(scores: np.ndarray) -> np.ndarray:
    """(s - median) / (1.4826 x MAD): how far a prompt's score stands out of the run's, in standard
    deviations of a normal with the same spread; insensitive to the few memorized outliers themselves."""
    med = np.median(scores)
    mad = 1.4826 * np.median(np.abs(scores - med))
    if mad == 0 and len(scores):  # one prompt, or more than half of them equal: no spread to stand out of
        log.warning("triage scores of %d prompts have no spread (median absolute deviation 0): "
                    "budget.continue_triage_z extends no prompt in this run", len(scores))
    return (scores - med) / mad if mad > 0 else np.zeros_like(scores)
