"""Triage stage: a memorization score for every prompt, for a few UNet calls each.

    run(cfg, run_name) -> summary   triage/ of a prepared run: one row per prompt of prompts.parquet

Wen et al. ("Detecting, Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024;
docs/method.md#2-triage): a memorized prompt pulls the noise prediction far from the unconditional
one, so ||eps(x_t, prompt) - eps(x_t, "")|| over the first step(s) ranks memorized prompts first
(published: AUC 0.96 from one step on Stable Diffusion). memex averages it over `triage.seeds`
starting noises, which are samples 0..seeds-1 of the prompt (the same seeds generation uses), and
`triage.steps` steps: seeds x steps x 2 UNet evaluations per prompt against 500 x 50 x 2 for the
paper's generations. The score is RMS per latent value (memex/sampling.py noise_norm).

Units: chunks of `triage.prompts_per_task` prompts through the actor pool (one model per actor),
like generation; the runner writes triage/shard-<chunk>.parquet and its marker.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from memex import runner
from memex.config import AuditConfig, BudgetKind, PromptSource, TriageKind
from memex.layout import TRIAGE_SCHEMA, RunLayout, StorageError
from memex.prompts import read_run_prompts
from memex.stages.generate import RunSampler, unet_work

log = logging.getLogger("memex.triage")


class TriagePrompts(RunSampler):
    """The worker of the actor pool: one model per actor (RunSampler); each call scores one chunk of prompts."""

    def __call__(self, index: int, p0: int, p1: int) -> tuple[pa.Table, dict]:
        """Prompts [p0, p1) -> one TRIAGE_SCHEMA row each, and the UNet evaluations they took."""
        from memex.sampling import sample_seed

        t, s = self.cfg.triage, self.cfg.sampling
        ids, texts = self.prompt_ids[p0:p1], self.prompts[p0:p1]
        rows_ids = [pid for pid in ids for _ in range(t.seeds)]  # prompt-major: seeds of one prompt together
        rows_texts = [p for p in texts for _ in range(t.seeds)]
        seeds = [sample_seed(s.seed, pid, j % t.seeds) for j, pid in enumerate(rows_ids)]
        before = self.sampler.unet_evaluations
        scores = self.sampler.triage(rows_ids, rows_texts, seeds, t.steps).reshape(len(ids), t.seeds).mean(axis=1)
        cost = self.sampler.unet_evaluations - before
        table = pa.table({"prompt_id": ids, "prompt": texts, "score": scores.astype(np.float32),
                          "unet_evaluations": [t.seeds * t.steps * 2] * len(ids)}, schema=TRIAGE_SCHEMA)
        return table, {"unet_evaluations": cost}


def run(cfg: AuditConfig, run_name: str) -> dict:
    """Score every prompt of a prepared run; returns the summary written to triage/_SUCCESS.json."""
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    if not layout.store.exists(layout.prompts_path):
        raise StorageError(f"{layout.uri} is not a prepared run folder (no prompts.parquet): call generate.prepare")
    layout.triage.claim({"triage": {"seeds": cfg.triage.seeds, "steps": cfg.triage.steps}},
                        f"run folder {layout.uri}")
    n = read_run_prompts(layout).num_rows
    step = cfg.triage.prompts_per_task
    chunks = {c: {"p0": p0, "p1": min(p0 + step, n)} for c, p0 in enumerate(range(0, n, step))}
    runner.run_actor_pool(layout.triage, chunks, TriagePrompts, {"cfg": cfg, "run_name": run_name}, cfg.resources)
    scores = layout.triage.read(columns=["score"])["score"].to_numpy()
    summary = {"prompts": n, "unet_evaluations": unet_work(layout.triage)["unet_evaluations"],
               "score_median": float(np.median(scores)) if len(scores) else None,
               "score_mad": float(np.median(np.abs(scores - np.median(scores)))) if len(scores) else None}
    layout.triage.mark_success(summary)
    return summary


def triage_on(cfg: AuditConfig) -> bool:
    """triage=auto scores prompts whenever there are prompts (text models); none never."""
    return cfg.triage.kind != TriageKind.none and cfg.prompts.source != PromptSource.none


def needs_stage(cfg: AuditConfig) -> bool:
    """Whether the scores must be computed before generation, by this stage. Guided generation
    computes every sample's first-step score for free (memex/sampling.py generate_scored), and a
    prompt's samples 0..seeds-1 start from the triage's own seeds: with triage.steps=1 and every
    prompt's first round holding >= triage.seeds samples, the samples give the same scores and the
    stage's 2 x seeds UNet evaluations a prompt are saved (192 on the demo audit). The stage runs when
    triage.keep ranks prompts before any generation, for more than one step, or without guidance."""
    t, s = cfg.triage, cfg.sampling
    first = cfg.budget.rounds[0] if cfg.budget.kind == BudgetKind.adaptive else s.samples_per_prompt
    return triage_on(cfg) and (t.keep is not None or t.steps > 1 or s.guidance_scale <= 1 or first < t.seeds)


def prompt_scores(cfg: AuditConfig, layout: RunLayout) -> dict[str, float]:
    """prompt id -> triage score: from triage/ when the stage ran, else the mean first-step score of
    each prompt's samples 0..triage.seeds-1 generated so far (needs_stage). Empty when triage is off."""
    if not triage_on(cfg):
        return {}
    if layout.triage.success() is not None:
        return {r["prompt_id"]: r["score"] for r in layout.triage.read(columns=["prompt_id", "score"]).to_pylist()}
    t = layout.samples.read(columns=["prompt_id", "triage_score"], filters=[("sample_index", "<", cfg.triage.seeds)])
    by: dict[str, list[float]] = {}
    for pid, sc in zip(t["prompt_id"].to_pylist(), t["triage_score"].to_pylist()):
        if sc is not None:
            by.setdefault(pid, []).append(sc)
    return {pid: float(np.mean(v)) for pid, v in by.items()}


def robust_z(scores: np.ndarray) -> np.ndarray:
    """(s - median) / (1.4826 x MAD): how far a prompt's score stands out of the run's, in standard
    deviations of a normal with the same spread; insensitive to the few memorized outliers themselves."""
    med = np.median(scores)
    mad = 1.4826 * np.median(np.abs(scores - med))
    return (scores - med) / mad if mad > 0 else np.zeros_like(scores)
