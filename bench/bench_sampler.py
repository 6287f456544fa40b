"""Generation throughput: memex's Sampler vs the plain diffusers loop vs a UNet-only bound.

    python bench/bench_sampler.py                                  # demo/models/demo-text: pixel_text, 32x32
    python bench/bench_sampler.py --prompts 4 --samples 500 --steps 10 --batch 64
    python bench/bench_sampler.py --model demo/models/demo-uncond --samples 500 --steps 10 --batch 64
    python bench/bench_sampler.py --tiny uncond16 --samples 500 --steps 10 --batch 256
    python bench/bench_sampler.py --mode stage --samples-total 2048 --batch 256 --steps 10
    python bench/bench_sampler.py --mode unet --batch 64 --threads 1          # UNet variants: channels_last, compile
    python bench/bench_sampler.py --samples 500 --steps 5 --batch 64 --channels-last   # + sampling.channels_last

--mode sampler: N = prompts x samples images (unconditional: one empty prompt, N = samples), same model,
scheduler, steps, guidance and per-sample seeds, in one process; after a warm-up the three alternate
--repeats times and their medians are printed as samples/s:
  memex  Sampler.generate(prompt_ids, prompts, seeds): fixed batches of --batch rows mixing prompts.
  plain  per prompt, batches of --batch (last one partial), one seeded CPU generator per image, "np" output:
         StableDiffusionPipeline(prompt=...) (latent_text); DDPMPipeline/DDIMPipeline(batch_size=...)
         (unconditional). pixel_text: no diffusers pipeline drives the demo model. IFPipeline.encode_prompt
         tokenizes to 77 (T5) tokens (the demo CLIP has 48 positions: avoidable with prompt_embeds=), and its
         loop always splits the UNet output into eps + a learned variance (IF: out_channels = 2 x in), a
         ValueError when out_channels = in_channels, with or without guidance. So `hand_loop` is IFPipeline's
         loop without that split (scale_model_input, UNet on 2n rows, guidance, scheduler.step), per prompt;
         IFPipeline(prompt_embeds=...) is used for learned-variance UNets, where it works.
         Text is encoded as memex does (model_max_length, no mask) per prompt, "" once, inside the timing.
  bound  the UNet alone: as many forward passes as memex makes (ceil(N / batch) x steps) on its input shape
         (2 x batch rows with guidance > 1): unet(x, t, encoder_hidden_states=...) under no_grad.
Then one instrumented memex run (timers wrapped around the Sampler instance's UNet, scheduler.step,
scale_model_input, noise, text embeddings and decode; memex code is untouched) and the PNG encoding the
generate stage adds per image (memex.images.encode_png) show where time outside the UNet goes. Also
printed: the max pixel difference memex vs plain (1/255 would be float rounding across batch shapes).

--mode stage: the generate stage end to end (generate.prepare + generate.run, local Ray with --threads
CPUs, storage.root in a tempdir) for a tiny unconditional 16x16 model, one empty prompt x --samples-total,
sampling.batch_size=--batch, shard_size 64 and 256, alternating --repeats times with a plain DDPMPipeline
loop in batches of --batch in this process (no PNG, no Parquet). The sampler runs fixed-shape batches;
before issue 13 each shard was padded to batch_size, so shard_size 64 < batch_size 256 computed 256 rows
to keep 64 (4x the UNet work). Shards now hold whole batches (memex/plan.py tie_shard_size), so both
sizes must show the same "UNet evals" (rows x steps, padding included, from the stage's summary). "stage s"
is generate.run's wall time (Ray actor start, model load included); "shards s" sums the shards' own
times from their markers (generation + PNG + Parquet); "vs plain" compares shards s with the plain loop.

--mode unet: the UNet alone (one forward on the sampler's batch shape, 2 x batch rows with guidance)
as loaded, with channels_last weights, under torch.compile, both, in bfloat16 and, on CUDA, in float16
with and without channels_last (--variants picks some), alternated --repeats times; prints each one's
speed-up, its first call (compile is paid once per actor) and its largest eps difference from the model
as loaded (any non-zero one changes a run's last float bits).

--dtype: the model's dtype (model.dtype) for every method of sampler and unet modes; audits on GPUs run
float16. bench/gpu_check.sh runs these modes on a lent GPU in one command.

--threads: on a machine whose cores are busy, more torch threads than free cores collapses throughput
(demo-text UNet, 32 rows: 0.15 s per forward at 1 thread vs 3.5 s at 2 with both cores loaded).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from timing import elapsed, timers  # bench/timing.py: the scripts run from bench/

from memex import config, tiny
from memex.config import ModelKind, SamplingConfig
from memex.images import encode_png
from memex.layout import RunLayout
from memex.models import load_model
from memex.prompts import prompt_id
from memex.sampling import Sampler, sample_seed, takes_generator
from memex.stages import generate

REPO = Path(__file__).resolve().parents[1]
PROMPTS = (REPO / "demo/prompts.txt").read_text().splitlines() + [
    "a lighthouse at dusk", "portrait of a man", "a cat on a sofa", "a vintage car", "a bowl of soup"]




def encode_text(pipe, text: str) -> torch.Tensor:  # (1, L, D): what Sampler._encode computes for a CLIP encoder
    tok = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.device))[0]


def plain_pipe(model):
    if model.kind != ModelKind.unconditional:
        return model.pipe
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    cls = DDIMPipeline if isinstance(model.pipe.scheduler, DDIMScheduler) else DDPMPipeline
    pipe = cls(unet=model.pipe.unet, scheduler=model.pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def if_pipeline_ok(pipe) -> bool:  # see the module doc
    return pipe.unet.config.out_channels == 2 * pipe.unet.config.in_channels


def hand_loop(pipe, emb, neg, gens, a) -> np.ndarray:
    """IFPipeline.__call__'s loop without the variance split: one batch of one prompt -> float (n, H, W, C)."""
    from diffusers.utils.torch_utils import randn_tensor

    unet, sched, n = pipe.unet, pipe.scheduler, len(gens)
    sched.set_timesteps(a.steps, device=unet.device)
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = randn_tensor(shape, generator=gens, device=unet.device, dtype=unet.dtype) * sched.init_noise_sigma
    cfg, kw = a.guidance > 1, {"generator": gens} if takes_generator(sched) else {}
    cond = torch.cat([neg.repeat(n, 1, 1), emb.repeat(n, 1, 1)]) if cfg else emb.repeat(n, 1, 1)  # (2n, L, D)
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(torch.cat([x, x]) if cfg else x, t), t, encoder_hidden_states=cond).sample
        if cfg:  # uncond rows first, as IF
            eps_u, eps_t = eps.chunk(2)
            eps = eps_u + a.guidance * (eps_t - eps_u)
        x = sched.step(eps, t, x, **kw).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


@torch.no_grad()
def plain_loop(pipe, kind: ModelKind, units, a) -> np.ndarray:
    by_prompt: dict[str, list[int]] = {}
    for text, seed in units:
        by_prompt.setdefault(text, []).append(seed)
    common = dict(num_inference_steps=a.steps, output_type="np")
    neg = encode_text(pipe, "") if kind == ModelKind.pixel_text else None
    out = []
    for text, seeds in by_prompt.items():
        emb = encode_text(pipe, text) if kind == ModelKind.pixel_text else None
        for b in range(0, len(seeds), a.batch):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[b : b + a.batch]]
            if kind == ModelKind.unconditional:
                img = pipe(batch_size=len(gens), generator=gens, **common).images
            elif kind == ModelKind.latent_text:
                img = pipe(prompt=text, num_images_per_prompt=len(gens), generator=gens,
                           guidance_scale=a.guidance, **common).images
            elif if_pipeline_ok(pipe):
                img = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_images_per_prompt=len(gens),
                           generator=gens, guidance_scale=a.guidance, **common).images
            else:
                img = hand_loop(pipe, emb, neg, gens, a)
            out.append((np.asarray(img) * 255).round().astype(np.uint8))  # float [0, 1] -> memex's uint8
    return np.concatenate(out)


def memex_run(sampler: Sampler, units) -> np.ndarray:
    texts = [t for t, _ in units]
    return sampler.generate([prompt_id(t) for t in texts], texts, [s for _, s in units])


@torch.no_grad()
def bound_loop(unet, n_forwards: int, x, cond, timesteps) -> None:
    for i in range(n_forwards):
        t = timesteps[i % len(timesteps)]
        unet(x, t, encoder_hidden_states=cond) if cond is not None else unet(x, t)


def instrument(sampler: Sampler, device: str) -> dict[str, list]:
    """Timers around the instance's parts (instance attributes shadow the methods): key -> [seconds, calls]."""
    acc, timed = timers(device)

    s, sched = sampler, sampler.scheduler
    for obj, name, key in [(s, "unet", "UNet forward"), (sched, "step", "scheduler.step"),
                           (sched, "scale_model_input", "scale_model_input"), (s, "_generators", "noise: generators"),
                           (s, "_initial_noise", "noise: initial randn"), (s, "embeddings", "text embeddings"),
                           (s, "_decode", "decode to uint8")]:
        setattr(obj, name, timed(getattr(obj, name), key))
    return acc


def sampler_mode(a) -> None:
    if a.tiny == "uncond16":
        path = str(tiny.build("unconditional", Path(tempfile.mkdtemp()) / "uncond16", image_size=16))
    elif a.tiny == "sd15":
        path = str(tiny.build_sd15(Path(tempfile.mkdtemp()) / "sd15"))
    else:
        path = a.model
    model = load_model(path, dtype=a.dtype, device=a.device)
    settings = SamplingConfig(num_inference_steps=a.steps, guidance_scale=a.guidance, batch_size=a.batch)
    sampler, pipe = Sampler(model, settings), plain_pipe(model)
    # --channels-last: memex with sampling.channels_last on its own copy of the model (the plain
    # loop and the as-loaded bound keep theirs), and that UNet's own bound
    cl = Sampler(load_model(path, dtype=a.dtype, device=a.device), dataclasses.replace(settings, channels_last=True)) \
        if a.channels_last else None
    texts = [""] if model.kind == ModelKind.unconditional else \
        (PROMPTS + [f"prompt number {i}" for i in range(a.prompts)])[: a.prompts]
    units = [(t, sample_seed(0, prompt_id(t), i)) for t in texts for i in range(a.samples)]
    n = len(units)

    # bound inputs: x (rows, C, h, w) and cond (rows, L, D), rows = batch (x2 with guidance)
    rows = a.batch * (2 if sampler.cfg else 1)
    h, w = sampler.height // sampler.vae_scale, sampler.width // sampler.vae_scale
    x = torch.randn(rows, sampler.unet_channels, h, w, device=sampler.device, dtype=sampler.dtype)
    cond = sampler.embeddings([prompt_id(texts[0])], texts[:1]).repeat(rows, 1, 1) if sampler.conditional else None
    sampler.scheduler.set_timesteps(a.steps, device=sampler.device)
    timesteps = list(sampler.scheduler.timesteps)  # 2nd-order schedulers list inner steps twice
    n_batches = -(-n // a.batch)
    n_forwards = n_batches * len(timesteps)

    runs = {"plain": lambda: plain_loop(pipe, model.kind, units, a), "memex": lambda: memex_run(sampler, units),
            "bound": lambda: bound_loop(sampler.unet, n_forwards, x, cond, timesteps)}
    if cl is not None:
        runs.update({"memex_cl": lambda: memex_run(cl, units),
                     "bound_cl": lambda: bound_loop(cl.unet, n_forwards, x, cond, timesteps)})
    plain_loop(pipe, model.kind, units[:1], a), memex_run(sampler, units[:1])  # warm-up
    bound_loop(sampler.unet, 2, x, cond, timesteps)
    if cl is not None:
        memex_run(cl, units[:1]), bound_loop(cl.unet, 2, x, cond, timesteps)
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(a.repeats):
        for k, fn in runs.items():
            times[k].append(elapsed(fn, a.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    ref, got = plain_loop(pipe, model.kind, units, a), memex_run(sampler, units)
    diff = int(np.abs(ref.astype(int) - got.astype(int)).max())

    print(f"model={path} kind={model.kind.value} {sampler.height}x{sampler.width}x{sampler.channels} "
          f"scheduler={sampler.scheduler_name} prompts={len(texts)} samples/prompt={a.samples} N={n} batch={a.batch} "
          f"(memex pads {n_batches * a.batch - n} rows) steps={a.steps} "
          f"guidance={a.guidance if sampler.conditional else '-'} threads={a.threads} device={a.device} "
          f"repeats={a.repeats}")
    plain = "hand-written IF" if model.kind == ModelKind.pixel_text and not if_pipeline_ok(pipe) \
        else type(pipe).__name__
    label = {"plain": f"plain {plain} loop", "memex": "memex Sampler.generate",
             "bound": f"UNet-only bound ({n_forwards} x {rows} rows)",
             "memex_cl": "memex, sampling.channels_last=true", "bound_cl": "UNet-only bound, channels_last"}
    for k in runs:
        print(f"{label[k]:<40s}: {n / med[k]:8.2f} samples/s  (median {med[k]:.2f}s)")
    print(f"memex/plain = {med['plain'] / med['memex']:.2f}x ; memex/bound = {med['bound'] / med['memex']:.2f} ; "
          f"max pixel difference memex vs plain = {diff}/255")
    if cl is not None:
        diff_cl = int(np.abs(ref.astype(int) - memex_run(cl, units).astype(int)).max())
        print(f"channels_last: memex/plain = {med['plain'] / med['memex_cl']:.2f}x ; "
              f"memex/its bound = {med['bound_cl'] / med['memex_cl']:.2f} ; "
              f"max pixel difference vs plain = {diff_cl}/255")

    # where memex's time goes: one instrumented run of a second Sampler on the same model
    probe = Sampler(model, settings)
    acc = instrument(probe, a.device)
    total = elapsed(lambda: memex_run(probe, units), a.device)
    png = elapsed(lambda: [encode_png(img, settings.png_compress_level) for img in got], a.device)
    print(f"memex breakdown (one instrumented run, {total:.2f}s):")
    for key, (sec, calls) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
        print(f"  {key:<24s} {sec:7.3f}s  {100 * sec / total:5.1f}%  ({calls} calls)")
    other = total - sum(v[0] for v in acc.values())
    print(f"  {'rest (cat, CFG, loop)':<24s} {other:7.3f}s  {100 * other / total:5.1f}%")
    print(f"  {'PNG encode (stage adds)':<24s} {png:7.3f}s  {100 * png / total:5.1f}% of generate")
    if med["bound"] / med["memex"] < 0.9:
        unet_s = acc["UNet forward"][0]
        print(f"memex is below 0.9 x bound: {total - unet_s:.2f}s of {total:.2f}s is outside the UNet (lines above); "
              f"UNet inside memex {unet_s:.2f}s vs bound {med['bound']:.2f}s")


def stage_mode(a) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    root = Path(tempfile.mkdtemp())
    folder = str(tiny.build("unconditional", root / "uncond16", image_size=16))
    ray.init(num_cpus=a.threads, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO block per Dataset otherwise
    pipe, n = plain_pipe(load_model(folder, device=a.device)), a.samples_total
    seeds = [sample_seed(0, "uncond", i) for i in range(n)]  # prompts=none: the one prompt's id is "uncond"

    rows: dict[int, int] = {}

    def stage(shard: int, rep: int) -> tuple[float, float]:
        cfg = config.GenerateConfig(
            model=config.ModelConfig(name="uncond16", path=folder),
            sampling=SamplingConfig(samples_per_prompt=n, batch_size=a.batch, num_inference_steps=a.steps,
                                    shard_size=shard),
            prompts=config.PromptsConfig(source=config.PromptSource.none),
            storage=config.StorageConfig(root=str(root / "runs")), run=config.RunConfig(name=f"s{shard}-r{rep}"),
            resources=config.ResourcesConfig(num_cpus=a.threads, device=a.device,
                                             num_gpus=1.0 if a.device.startswith("cuda") else 0.0))
        summary = generate.run(cfg, generate.prepare(cfg))
        samples = RunLayout(cfg.storage.root, cfg.run.name).samples
        rows[shard] = summary["unet_evaluations"]  # UNet rows computed, padding included (memex/sampling.py)
        return summary["seconds"], sum(samples.read_marker(i)["seconds"] for i in samples.complete())

    @torch.no_grad()
    def plain() -> tuple[float, float]:
        t0 = time.perf_counter()
        for b in range(0, n, a.batch):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[b : b + a.batch]]
            pipe(batch_size=len(gens), generator=gens, num_inference_steps=a.steps, output_type="np")
        return 0.0, time.perf_counter() - t0

    pipe(batch_size=2, generator=[torch.Generator().manual_seed(i) for i in range(2)], num_inference_steps=1)
    times: dict = defaultdict(list)
    for rep in range(a.repeats):
        times["plain"].append(plain())
        for shard in (64, 256):
            times[shard].append(stage(shard, rep))
    print(f"stage: tiny unconditional 16x16 N={n} batch_size={a.batch} steps={a.steps} threads={a.threads} "
          f"device={a.device} repeats={a.repeats} (medians)")
    print(f"{'method':<30s} {'UNet evals':>10s} {'stage s':>8s} {'shards s':>9s} {'samples/s':>10s} "
          f"{'(shards)':>9s} {'vs plain':>8s}")  # samples/s: N / stage s, then N / shards s
    p = statistics.median(s for _, s in times["plain"])
    print(f"{'plain DDPMPipeline loop':<30s} {n * a.steps:10d} {'-':>8s} {p:9.2f} {'-':>10s} {n / p:9.2f} {1:8.2f}")
    for shard in (64, 256):
        wall, work = (statistics.median(v[j] for v in times[shard]) for j in (0, 1))
        print(f"{f'memex stage shard_size={shard}':<30s} {rows[shard]:10d} {wall:8.2f} {work:9.2f} {n / wall:10.2f} "
              f"{n / work:9.2f} {p / work:8.2f}")
    ray.shutdown()


def unet_mode(a) -> None:
    """The UNet alone on the sampler's batch shape, as loaded and in the variants that could make the
    UNet itself faster (the bound above is 1.09x the plain loop on CPU, so nothing outside the UNet can
    reach 1.3x): channels_last weights, torch.compile (inductor), both, and bfloat16. Each variant is a
    copy of the same UNet; they alternate --repeats times after a warm-up, whose seconds are printed
    for compile (paid once per actor); max |eps difference| against the model as loaded."""
    import copy

    path = str(tiny.build_sd15(Path(tempfile.mkdtemp()) / "sd15")) if a.tiny == "sd15" else a.model
    model = load_model(path, dtype=a.dtype, device=a.device)
    s = Sampler(model, SamplingConfig(num_inference_steps=a.steps, guidance_scale=a.guidance, batch_size=a.batch))
    rows = a.batch * (2 if s.cfg else 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, s.unet_channels, s.height // s.vae_scale, s.width // s.vae_scale, generator=g).to(s.device)
    cond = s.embeddings(["p"], ["a red star logo"]).repeat(rows, 1, 1) if s.conditional else None
    t = torch.tensor(500)
    base = s.unet.eval()
    cl = lambda u: u.to(memory_format=torch.channels_last)  # noqa: E731
    make = {"cl": ("channels_last", lambda: cl(copy.deepcopy(base))),
            "compile": ("torch.compile", lambda: torch.compile(copy.deepcopy(base))),
            "cl+compile": ("channels_last + compile", lambda: torch.compile(cl(copy.deepcopy(base)))),
            "bf16": ("bfloat16", lambda: copy.deepcopy(base).to(torch.bfloat16)),
            "fp16": ("float16", lambda: copy.deepcopy(base).to(torch.float16)),
            "fp16+cl": ("float16 + channels_last", lambda: cl(copy.deepcopy(base).to(torch.float16)))}
    # float16 convolutions: a GPU's; on CPU they are slower still than bfloat16's
    wanted = a.variants.split(",") if a.variants else [k for k in make if "fp16" not in k or a.device != "cpu"]
    unknown = [k for k in wanted if k not in make]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(make)}")
    variants = {"as loaded": base, **{make[k][0]: make[k][1]() for k in wanted}}

    @torch.no_grad()
    def fwd(u):
        dt = next(u.parameters()).dtype
        kw = {"encoder_hidden_states": cond.to(dt)} if cond is not None else {}
        return u(x.to(dt), t, **kw).sample.float()

    ref, warm = fwd(base), {}
    diff = {}
    for k, u in variants.items():
        warm[k] = elapsed(lambda: fwd(u), a.device)
        diff[k] = float((fwd(u) - ref).abs().max())
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(a.repeats):
        for k, u in variants.items():
            times[k].append(elapsed(lambda: fwd(u), a.device))
    print(f"unet: model={path} {rows} rows of {tuple(x.shape[1:])} threads={a.threads} device={a.device} "
          f"repeats={a.repeats} (medians)")
    base_s = statistics.median(times["as loaded"])
    for k in variants:
        med = statistics.median(times[k])
        print(f"{k:<26s}: {med:7.3f} s/forward  {base_s / med:5.2f}x  first call {warm[k]:6.1f} s  "
              f"max |eps diff| {diff[k]:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="sampler", choices=["sampler", "stage", "unet"])
    ap.add_argument("--model", default=str(REPO / "demo/models/demo-text"), help="diffusers folder (sampler mode)")
    ap.add_argument("--tiny", default="none", choices=["none", "uncond16", "sd15"],
                    help="uncond16 (sampler, stage) or sd15 (sampler, unet: SD 1.x layout, 512 px, PNDM): "
                         "build a tiny model instead")
    ap.add_argument("--prompts", type=int, default=3, help="text models; unconditional models use one empty prompt")
    ap.add_argument("--samples", type=int, default=16, help="samples per prompt (the paper: 500)")
    ap.add_argument("--samples-total", type=int, default=2048, help="stage mode: samples of the run")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=None, help="UNet batch (default: 16; stage mode: 256)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; stage: Ray CPUs, per actor")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--variants", default=None,
                    help="unet mode: comma-separated, of cl, compile, cl+compile, bf16, fp16, fp16+cl "
                         "(default: all; fp16 ones on CUDA only); the model as loaded is always timed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="model.dtype for every method (sampler, unet modes; on a GPU: float16, as audits run there)")
    ap.add_argument("--channels-last", action="store_true",
                    help="sampler mode: also time memex with sampling.channels_last=true and its UNet-only bound")
    a = ap.parse_args()
    a.batch = a.batch or (256 if a.mode == "stage" else 16)
    torch.set_num_threads(a.threads)
    {"sampler": sampler_mode, "stage": stage_mode, "unet": unet_mode}[a.mode](a)


if __name__ == "__main__":
    main()
