"""Generation stage: the run's prompts -> an actor pool of samplers -> samples/ Parquet shards.

    prepare(cfg, prompts=None) -> run name   check inputs, claim the run folder, write prompts.parquet
    run(cfg, run_name) -> summary            every shard of the run's rounds, through memex/runner.py

A unit is a shard: a contiguous range of (prompt, sample index) pairs of one round, prompt-major
(memex/plan.py). A run with no round written gets the fixed budget: one round, every prompt,
samples [0, samples_per_prompt). `GenerateShards` is the worker: it loads the model once (one per
actor) and generates a whole shard in UNet batches of `sampling.batch_size`, mixing prompts; the
runner writes the shard and its marker (with the UNet evaluations it took), skips finished shards
and checks none is missing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from memex import runner
from memex.checkpoints import claim_weights, model_weights_sha256
from memex.config import (
    ConfigError,
    GenerateConfig,
    ModelKind,
    PromptSource,
    check_actor_devices,
    model_identity,
    plain,
    validate_generate,
)
from memex.images import encode_png
from memex.layout import PROMPTS_SCHEMA, SAMPLES_SCHEMA, RunLayout, StorageError
from memex.lease import hold
from memex.models import (
    check_kind,
    check_model_inputs,
    check_scheduler,
    check_unet_fits,
    conditioning_keys,
    resolve_device,
)
from memex.plan import SamplePlan, Shard
from memex.prompts import load_prompts, read_run_prompts
from memex.redact import redact, redact_text
from memex.storage import StageFolder, Store

log = logging.getLogger("memex.generate")


def model_and_sampling(cfg: GenerateConfig) -> dict:
    """The model and sampling part of run.json: what decides each generation's pixels."""
    # batch_size stays in: it fixes the UNet batch shape, which decides the last float bit
    # (memex.sampling), so a resumed run must keep it to reproduce its rows byte for byte.
    s = plain(cfg.sampling)
    if not s["channels_last"]:  # added after runs existed: off, it is left out so they still resume
        del s["channels_last"]
    if s["decode_batch_size"] is None:  # likewise: the whole batch, as every run before it decoded
        del s["decode_batch_size"]
    return {"model": model_identity(cfg.model), "sampling": s}


def weight_keys(model) -> str:
    """The model.* settings that name the weights, as a refusal names them."""
    return redact_text(", ".join(f"model.{k}={getattr(model, k)}" for k in ("path", "unet", "lora", "text_encoder")
                                 if getattr(model, k)))


def run_settings(cfg: GenerateConfig, prompts: pa.Table) -> dict:
    """Everything that decides the rows of a run; a rerun of the same run must match it exactly."""
    digest = hashlib.sha256()
    for pid, p in zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist()):
        digest.update(f"{pid}\x1f{p}\x1e".encode())
    return {**model_and_sampling(cfg), "prompts_sha256": digest.hexdigest(), "n_prompts": prompts.num_rows}


def default_run_name(cfg: GenerateConfig, settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.model.name}-{h}"


def prepare(cfg: GenerateConfig, prompts: pa.Table | None = None, weights: bool = True,
            unmerged: Callable[[], pa.Table] | None = None) -> str:
    """Check inputs before any cluster work, then claim the run folder; returns the run name.

    `prompts` (prompt_id, prompt) replaces cfg.prompts when given: the audit ranks training
    captions by near-duplicate counts from its index and passes the result here. `weights`: record the
    model's weights in weights.json, or refuse others (checkpoints.claim_weights). `unmerged`: the same
    prompts read without the model's tokenizer (memex.prompts), which a run folder started before they
    were merged by it resumes with.
    """
    # 1. inputs: config ranges, model folder, prompts
    validate_generate(cfg)
    check_model(cfg)
    if prompts is None:
        same = prompt_keys(cfg)
        prompts = load_prompts(cfg.prompts, cfg.storage.options, same)
        unmerged = lambda: load_prompts(cfg.prompts, cfg.storage.options, by_text=False)  # noqa: E731

    # 2. the run folder: same settings and weights (resume) or refuse; its prompts are the stage's input
    # (memex nightly names its run folders by the weights' hash already, and its plan has read them or knows
    # them from its ledger: `weights=False` spares reading them again)
    sha = model_weights_sha256(cfg.model.path, cfg.model.unet, cfg.model.lora, cfg.model.text_encoder,
                               cfg.model.variant) if weights else None
    settings = redact(run_settings(cfg, prompts))  # run.json holds no credential; a rotated one still resumes
    prompts, settings = started_unmerged(cfg, prompts, settings, unmerged)
    run_name = cfg.run.name or default_run_name(cfg, settings)
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    layout.store.check_writable("run folder", "storage.root (bucket name, folder permissions) and "
                                "storage.options (endpoint_url, credentials)")
    # under the run folder's lease: claim reads, then writes, so two jobs starting one run.name with other
    # settings could both find no run.json and both write theirs (the last one won)
    with hold(layout.store, cfg.storage, f"run folder {layout.uri}"):
        layout.store.claim(layout.run_json, settings, f"run folder {layout.uri}",
                           "Use another run.name (or storage.root) for a new experiment.")
        claim_weights(layout.store, layout.weights_json, sha, f"run folder {layout.uri}", weight_keys(cfg.model))
        if not layout.store.exists(layout.prompts_path):
            layout.store.write_table(layout.prompts_path, prompts.cast(PROMPTS_SCHEMA))
    return run_name


def started_unmerged(cfg: GenerateConfig, prompts: pa.Table, settings: dict,
                     unmerged: Callable[[], pa.Table] | None) -> tuple[pa.Table, dict]:
    """(prompts, settings) of the run folder to claim: a run started before prompts the model reads as the
    same tokens were merged (2026-12-07) keeps its prompts, so it resumes (a nightly's, named by the weights
    and the config, was otherwise refused every night); a new run gets the merged ones."""
    if unmerged is None or _holds(cfg, cfg.run.name or default_run_name(cfg, settings), settings) \
            or not _may_be_started(cfg):
        return prompts, settings
    old = unmerged()
    old_settings = redact(run_settings(cfg, old))
    if old_settings != settings and _holds(cfg, cfg.run.name or default_run_name(cfg, old_settings), old_settings):
        log.info("the run folder was started before prompts read as the same tokens were merged: it resumes with "
                 "its %d prompts (a new run gets %d)", old.num_rows, prompts.num_rows)
        return old, old_settings
    return prompts, settings


def _may_be_started(cfg: GenerateConfig) -> bool:
    """Whether a run folder this command may resume exists at all: run.name's (its run.json), else one of the
    model's default names (<model.name>-*, one listing of storage.root). Else no folder holds the unmerged
    prompts, and they are not read: a first run read (and ranked) its prompts twice, the whole caption column of a
    prompts=captions manifest each time."""
    if cfg.run.name:
        layout = RunLayout(cfg.storage.root, cfg.run.name, cfg.storage.options)
        return layout.store.exists(layout.run_json)
    root = Store(cfg.storage.root, cfg.storage.options)
    return bool(root.listing(root.path, glob.escape(cfg.model.name) + "-*"))


def _holds(cfg: GenerateConfig, run_name: str, settings: dict) -> bool:
    """Whether the run folder's run.json records exactly these settings."""
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    return layout.store.holds(layout.run_json, settings)


def prompt_keys(cfg: GenerateConfig):
    """The model's reading of a prompt (models.conditioning_keys), after check_model; None without prompts."""
    if cfg.prompts.source == PromptSource.none:
        return None
    return conditioning_keys(cfg.model.path, cfg.model.revision)


def check_model(cfg: GenerateConfig) -> None:
    """The model and how it is sampled, from its config files and the resources, before any work (each
    failed in every sampler actor, after an audit's index build): the devices the actors get, the weights'
    files and headers, its kind, the UNet against its text encoder, VAE and image size, the solver."""
    check_actor_devices(cfg.resources, cfg.sampling.dtype)
    declared = check_model_inputs(cfg.model.path, cfg.model.unet, cfg.model.allow_pickle, cfg.model.revision,
                                  cfg.model.variant, cfg.model.lora, cfg.model.text_encoder)
    check_kind(cfg.model.path, cfg.model.kind, declared, cfg.prompts.source != PromptSource.none)
    check_guidance(cfg.model.path, declared or cfg.model.kind, cfg.prompts.source != PromptSource.none,
                   cfg.sampling.guidance_scale, "prompts=none gives")
    if cfg.sampling.decode_batch_size is not None and declared in (ModelKind.pixel_text, ModelKind.unconditional):
        # it decodes nothing there (the UNet's output is the image), yet it is part of the run's identity: set, it
        # named a new run folder for the same pixels, or refused the resume of an explicit run.name
        raise ConfigError(f"sampling.decode_batch_size={cfg.sampling.decode_batch_size} is set, and model.path="
                          f"{cfg.model.path} is a {declared.value} model with no VAE to decode with: drop the key")
    check_unet_fits(cfg.model.path, cfg.model.unet, cfg.model.text_encoder, cfg.model.revision,
                    cfg.sampling.height, cfg.sampling.width)
    check_scheduler(cfg.model.path, cfg.model.revision, cfg.sampling.scheduler, cfg.sampling.num_inference_steps)


def check_guidance(path: str, kind: ModelKind, prompted: bool, guidance_scale: float, what: str) -> None:
    """A text model sampled with the empty prompt alone (`prompted` False) and guidance on: guidance runs the
    empty prompt against itself, two identical UNet rows a sample and step whose difference is 0, so twice the
    UNet evaluations for the images of the text prediction alone, and a triage score of 0.0 stored for every
    sample. `kind` auto (a hub id not read yet): RunSampler checks the loaded model."""
    if kind in (ModelKind.pixel_text, ModelKind.latent_text) and not prompted and guidance_scale > 1.0:
        raise ConfigError(f"{what} model.path={path}, a {kind.value} model, only the empty prompt, and "
                          f"sampling.guidance_scale={guidance_scale} would guide it against the empty prompt: twice "
                          "the UNet evaluations for the same images. Set sampling.guidance_scale=1, or give it "
                          "prompts (prompts=file prompts.path=...). A run folder generated so before is kept: "
                          "match its samples again with run.samples_from=<its run name> (no generation)")


class RunSampler:
    """What every actor that runs the model loads once (generation, triage): the run's prompts and
    a Sampler of cfg.model on this process's device."""

    def __init__(self, cfg: GenerateConfig, run_name: str):
        from memex.models import load_model
        from memex.sampling import Sampler

        self.cfg = cfg
        prompts = read_run_prompts(RunLayout(cfg.storage.root, run_name, cfg.storage.options))
        self.prompt_ids = prompts["prompt_id"].to_pylist()
        self.prompts = prompts["prompt"].to_pylist()
        device = resolve_device(cfg.resources.device)
        if device == "cpu" and cfg.sampling.dtype.value == "float16":
            raise ConfigError("sampling.dtype=float16 needs a GPU; use float32 or bfloat16 on CPU")
        model = load_model(cfg.model.path, cfg.model.kind, cfg.sampling.dtype.value, device, cfg.model.revision,
                           cfg.model.unet, cfg.model.allow_pickle, cfg.model.variant, cfg.model.lora,
                           cfg.model.text_encoder)
        check_kind(cfg.model.path, ModelKind.auto, model.kind, any(self.prompts))  # a hub id checked only now
        check_guidance(cfg.model.path, model.kind, any(self.prompts), cfg.sampling.guidance_scale,
                       "every prompt of the run is empty, which gives")
        self.sampler = Sampler(model, cfg.sampling)
        self.model_id = model.model_id


class GenerateShards(RunSampler):
    """The worker of the actor pool: one model per actor; each call generates one whole shard.

    A batch's PNGs are encoded on a thread of their own while the next batch samples: zlib and PIL
    release the GIL, and a GPU actor's CPU is otherwise idle while the UNet runs. PNG encoding is
    ~35-50 ms an image at 512 px (level 1); done in turn it was 1/10 of the stage's time on this CPU
    with a core to spare (bench/RESULTS.md, PNG encoding overlapped), and a fast GPU's sample takes
    less time, so the share there is larger (not measured: no GPU). `encode_threads = 0` encodes in
    turn."""

    encode_threads = 1

    def __init__(self, cfg: GenerateConfig, run_name: str):
        super().__init__(cfg, run_name)
        self.plan = SamplePlan.read(RunLayout(cfg.storage.root, run_name, cfg.storage.options).store)
        self._encoder = ThreadPoolExecutor(self.encode_threads, "png") if self.encode_threads else None

    def _encode(self, images) -> "Future[list[bytes]] | list[bytes]":
        level = self.cfg.sampling.png_compress_level
        if self._encoder is None:
            return [encode_png(img, level) for img in images]
        return self._encoder.submit(lambda: [encode_png(img, level) for img in images])

    def __call__(self, index: int, round: int, start: int, stop: int) -> tuple[pa.Table, dict]:
        """Units [start, stop) of a round (prompt-major) as one SAMPLES_SCHEMA table, and the UNet
        evaluations they took (the marker keeps them: summaries add them up)."""
        from memex.sampling import made_on, sample_seed

        s, sampler = self.cfg.sampling, self.sampler
        evals0, padded0 = sampler.unet_evaluations, sampler.padded_evaluations
        units = list(self.plan.units(Shard(index, round, start, stop)))
        cols: dict[str, list] = {f.name: [] for f in SAMPLES_SCHEMA}
        pngs = []  # per batch: its PNGs, or the future that encodes them while the next batch samples
        for b in range(0, len(units), s.batch_size):  # one UNet batch at a time: bounded memory
            chunk = units[b : b + s.batch_size]
            pids = [self.prompt_ids[p] for p, _ in chunk]
            texts = [self.prompts[p] for p, _ in chunk]
            seeds = [sample_seed(s.seed, pid, i) for pid, (_, i) in zip(pids, chunk)]
            images, scores = sampler.generate_scored(pids, texts, seeds)
            cols["triage_score"] += [None] * len(chunk) if scores is None else scores.tolist()
            pngs.append(self._encode(images))
            for (p, i), pid, text, seed, img in zip(chunk, pids, texts, seeds, images):
                cols["sample_id"].append(f"{pid}/{i}")
                cols["prompt_id"].append(pid)
                cols["prompt"].append(text)
                cols["sample_index"].append(i)
                cols["seed"].append(seed)
                cols["height"].append(img.shape[0])
                cols["width"].append(img.shape[1])
        cols["image"] = [png for batch in pngs for png in (batch if isinstance(batch, list) else batch.result())]
        n = len(units)
        cols["model_id"] = [self.model_id] * n
        cols["scheduler"] = [sampler.scheduler_name] * n
        cols["num_inference_steps"] = [s.num_inference_steps] * n
        # the scale the samples were made at: up to 1 is the text prediction alone (diffusers' rule too), so 1.0;
        # an unconditional model has none
        cols["guidance_scale"] = [(s.guidance_scale if sampler.cfg else 1.0) if sampler.conditional else 0.0] * n
        cols["dtype"] = [s.dtype.value] * n
        cols["batch_size"] = [s.batch_size] * n
        cols["round"] = [round] * n
        cost = {"unet_evaluations": sampler.unet_evaluations - evals0,
                "padded_evaluations": sampler.padded_evaluations - padded0,
                "made_on": made_on(sampler.device)}  # the device model or CPU thread count: the bytes depend on it
        return pa.table(cols, schema=SAMPLES_SCHEMA), cost


def read_plan(cfg: GenerateConfig, layout: RunLayout, prompt_rows: list[int] | None = None) -> SamplePlan:
    """The run's rounds; a run with none written gets the fixed budget's one round (written now):
    samples [0, samples_per_prompt) of every prompt, or of `prompt_rows` (the audit's triage.keep)."""
    plan = SamplePlan.read(layout.store)
    if not plan.rounds:
        s = cfg.sampling
        plan.add_round(layout.store, prompt_rows, read_run_prompts(layout).num_rows, 0, s.samples_per_prompt,
                       s.shard_size, s.batch_size)
    return plan


def run(cfg: GenerateConfig, run_name: str, fixed: bool = False) -> dict:
    """Generate every shard of every round of a prepared run; returns the summary written to
    samples/_SUCCESS.json (rewritten when a later round is added and generated).

    `fixed`: the run is `memex generate`'s, the fixed budget (samples_per_prompt of every prompt), and rounds
    another budget wrote are refused. An adaptive or triage.keep audit of the same model, sampling and prompts
    shares the default run name, and its rounds were resumed as they stood: some prompts at the first round's
    samples, the command reporting success. An audit checks its own budget and calls this once a round."""
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    if not layout.store.exists(layout.run_json):
        raise StorageError(f"{layout.uri} is not a prepared run folder (no run.json): call generate.prepare first")
    runner.init(cfg.resources, cfg.storage)  # refuses a local storage.root on a multi-node cluster
    # one process at a time in a run folder (<run>/_lease.json); inside an audit, the audit's lease
    with hold(layout.store, cfg.storage, f"run folder {layout.uri}"):
        return generate_all(cfg, run_name, layout, fixed)


def generate_all(cfg: GenerateConfig, run_name: str, layout: RunLayout, fixed: bool = False) -> dict:
    """`run` under the run folder's lease."""
    plan = read_plan(cfg, layout)
    if fixed:
        n = cfg.sampling.samples_per_prompt
        plan.check_budget(layout.store, [n], None, f"memex generate: sampling.samples_per_prompt={n} of every "
                          "prompt; an audit's rounds, budget=adaptive or triage.keep, resume with memex audit")
    shards = plan.shards()
    log.info("run %s: %d shards in %d round(s)", layout.uri, len(shards), len(plan.rounds))
    t0 = time.perf_counter()
    generated = runner.run_actor_pool(layout.samples,
                                      {p.index: {"round": p.round, "start": p.start, "stop": p.stop} for p in shards},
                                      GenerateShards, {"cfg": cfg, "run_name": run_name}, cfg.resources)
    summary = {"run": layout.uri, "run_name": run_name, "shards": len(shards), "generated_shards": generated,
               # the rounds that sample: an adaptive run's decision to stop is a round of no prompts, written after
               # the first run's generation and counted by a rerun's, which changed this file and so refused the
               # re-matches of the run (rematch.source_generations) though nothing was generated again
               "rounds": sum(1 for r in plan.rounds if r.n_prompts), "rows": sum(p.stop - p.start for p in shards),
               "seconds": round(time.perf_counter() - t0, 2), **unet_work(layout.samples)}
    layout.samples.mark_success(summary)
    return summary


def unet_work(folder: StageFolder) -> dict:
    """UNet evaluations (batch rows through the UNet, guidance counting 2) of every complete unit of
    a model stage (samples/, triage/), from their markers, and the part spent on padding rows; `made_on`:
    the devices (or CPU thread counts) its samples' units ran on, more than one for a run resumed elsewhere."""
    marks = [folder.read_marker(i) or {} for i in folder.complete()]
    work = {"unet_evaluations": sum(m.get("unet_evaluations", 0) for m in marks),
            "padded_evaluations": sum(m.get("padded_evaluations", 0) for m in marks)}
    made = sorted({m["made_on"] for m in marks if "made_on" in m})  # none in markers written before it was kept
    return {**work, "made_on": made} if made else work
