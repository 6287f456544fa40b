"""Generation stage: prompts -> Ray Data actor pool of samplers -> Parquet shards on storage.

Driver (`run`): validate config, load prompts, claim the run folder, plan shards, skip complete
ones, and stream the rest through `ray.data ... map_batches(GenerateShards, compute=ActorPool)`.
Each actor loads the model once in `__init__`; `__call__` gets a batch of shard plans, generates
each shard in UNet batches of `sampling.batch_size` (mixing prompts), and writes the shard itself.

Why actors write their own shards instead of `Dataset.write_parquet`: a shard must be named by
its plan index and marked complete only after its file is in place, so a rerun skips finished
shards and never duplicates rows. Ray's datasinks name files per write task and have no
per-file marker. Only a one-line summary per shard returns to the driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pyarrow as pa

from memex.config import ConfigError, GenerateConfig, ModelKind, PromptSource, plain, validate_generate
from memex.layout import SAMPLES_SCHEMA, RunLayout, StorageError, ShardPlan, iter_units, plan_shards
from memex.models import check_model_inputs, resolve_device
from memex.prompts import load_prompts

log = logging.getLogger("memex.generate")


def run_settings(cfg: GenerateConfig, prompts: pa.Table) -> dict:
    """Everything that decides the rows of a run; a rerun of the same run must match it exactly."""
    # batch_size stays in: it fixes the UNet batch shape, which decides the last float bit
    # (memex.sampling), so a resumed run must keep it to reproduce its rows byte for byte.
    s = plain(cfg.sampling)
    digest = hashlib.sha256()
    for pid, p in zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist()):
        digest.update(f"{pid}\x1f{p}\x1e".encode())
    return {"model": plain(cfg.model), "sampling": s, "prompts_sha256": digest.hexdigest(),
            "n_prompts": prompts.num_rows}


def default_run_name(cfg: GenerateConfig, settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.model.name}-{h}"


class GenerateShards:
    """Ray Data callable class: one model per actor; each call generates and writes whole shards."""

    def __init__(self, cfg: GenerateConfig, run_name: str):
        from memex.models import load_model
        from memex.sampling import Sampler, SamplerSettings

        self.cfg = cfg
        self.layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
        prompts = self.layout.read_prompts()
        self.prompt_ids = prompts["prompt_id"].to_pylist()
        self.prompts = prompts["prompt"].to_pylist()
        device = resolve_device(cfg.resources.device)
        if device == "cpu" and cfg.sampling.dtype.value == "float16":
            raise ConfigError("sampling.dtype=float16 needs a GPU; use float32 or bfloat16 on CPU")
        model = load_model(cfg.model.path, cfg.model.kind, cfg.sampling.dtype.value, device, cfg.model.revision,
                           cfg.model.unet)
        if model.kind == ModelKind.unconditional and any(self.prompts):
            raise ConfigError(f"{cfg.model.path} is an unconditional model and takes no prompts: set prompts=none")
        s = cfg.sampling
        self.sampler = Sampler(model, SamplerSettings(s.scheduler, s.num_inference_steps, s.guidance_scale, s.height, s.width,
                                                         s.batch_size))
        self.model_id = model.model_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = []
        for index, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            plan = ShardPlan(int(index), int(start), int(stop))
            if self.layout.is_complete("samples", plan.index):  # finished by an earlier attempt
                done.append((plan.index, 0, 0.0))
                continue
            t0 = time.perf_counter()
            table = self.generate_shard(plan)
            self.layout.write_shard("samples", plan.index, table, {"seconds": time.perf_counter() - t0})
            done.append((plan.index, table.num_rows, time.perf_counter() - t0))
        return {"shard": np.array([d[0] for d in done]), "rows": np.array([d[1] for d in done]),
                "seconds": np.array([d[2] for d in done])}

    def generate_shard(self, plan: ShardPlan) -> pa.Table:
        from memex.sampling import sample_seed, to_png

        s, sampler = self.cfg.sampling, self.sampler
        units = list(iter_units(plan, s.samples_per_prompt))
        cols: dict[str, list] = {f.name: [] for f in SAMPLES_SCHEMA}
        for b in range(0, len(units), s.batch_size):  # one UNet batch at a time: bounded memory
            chunk = units[b : b + s.batch_size]
            pids = [self.prompt_ids[p] for p, _ in chunk]
            texts = [self.prompts[p] for p, _ in chunk]
            seeds = [sample_seed(s.seed, pid, i) for pid, (_, i) in zip(pids, chunk)]
            images = sampler.generate(pids, texts, seeds)
            for (p, i), pid, text, seed, img in zip(chunk, pids, texts, seeds, images):
                cols["sample_id"].append(f"{pid}/{i}")
                cols["prompt_id"].append(pid)
                cols["prompt"].append(text)
                cols["sample_index"].append(i)
                cols["seed"].append(seed)
                cols["image"].append(to_png(img, s.png_compress_level))
                cols["height"].append(img.shape[0])
                cols["width"].append(img.shape[1])
        n = len(units)
        cols["model_id"] = [self.model_id] * n
        cols["scheduler"] = [sampler.scheduler_name] * n
        cols["num_inference_steps"] = [s.num_inference_steps] * n
        cols["guidance_scale"] = [s.guidance_scale if sampler.conditional else 0.0] * n
        cols["dtype"] = [s.dtype.value] * n
        cols["batch_size"] = [s.batch_size] * n
        return pa.table(cols, schema=SAMPLES_SCHEMA)


def run(cfg: GenerateConfig, prompts: pa.Table | None = None) -> dict:
    """Generate all samples of a run; returns a summary (run URI, shard and row counts).

    `prompts` (prompt_id, prompt) replaces cfg.prompts when given: the audit ranks training
    captions by near-duplicate counts from its index and passes the result here.
    """
    import ray

    # 1. check inputs before any cluster work
    validate_generate(cfg)
    if cfg.model.kind == ModelKind.unconditional and cfg.prompts.source != PromptSource.none:
        raise ConfigError("model.kind=unconditional takes no prompts: set prompts=none")
    check_model_inputs(cfg.model.path, cfg.model.unet)
    if prompts is None:
        prompts = load_prompts(cfg.prompts, cfg.storage.options)

    # 2. claim the run folder (same settings, or refuse) and plan shards
    settings = run_settings(cfg, prompts)
    run_name = cfg.run.name or default_run_name(cfg, settings)
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    layout.create()
    layout.claim_run(settings)
    if not layout.fs.exists(layout.prompts_path):
        layout.write_prompts(prompts)
    plans = plan_shards(prompts.num_rows, cfg.sampling.samples_per_prompt, cfg.sampling.shard_size)
    complete = set(layout.complete_shards("samples"))
    todo = [p for p in plans if p.index not in complete]
    log.info("run %s: %d shards, %d complete, %d to generate", layout.uri, len(plans), len(complete), len(todo))

    # 3. stream the remaining shards through the actor pool
    t0 = time.perf_counter()
    if todo:
        if not ray.is_initialized():
            ray.init(address=cfg.resources.address, log_to_driver=True)
        r = cfg.resources
        ds = ray.data.from_items(
            [{"shard": p.index, "start": p.start, "stop": p.stop} for p in todo],
            override_num_blocks=len(todo),
        ).map_batches(
            GenerateShards,
            fn_constructor_kwargs={"cfg": cfg, "run_name": run_name},
            batch_size=1,  # one shard per call: a shard is the unit of work and of resume
            compute=ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
            num_gpus=r.num_gpus,
            num_cpus=r.num_cpus,
        )
        for row in ds.iter_rows():  # tiny summary rows only; images never reach the driver
            log.info("shard %06d: %d rows in %.1fs", row["shard"], row["rows"], row["seconds"])

    # 4. mark the stage complete
    total = sum(p.stop - p.start for p in plans)
    summary = {"run": layout.uri, "run_name": run_name, "shards": len(plans), "generated_shards": len(todo),
               "rows": total, "seconds": round(time.perf_counter() - t0, 2)}
    missing = [p.index for p in plans if not layout.is_complete("samples", p.index)]
    if missing:
        raise StorageError(f"shards {missing[:10]} did not complete; rerun the same command to resume")
    layout.write_json(layout.join("samples", "_SUCCESS.json"), summary)
    return summary
