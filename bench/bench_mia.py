"""Membership-inference throughput (issue 15): MiaScorer.score vs a UNet-only bound, and shadow models.

    python bench/bench_mia.py                                   # 132 s on 2 idle cores (bench/RESULTS.md)
    python bench/bench_mia.py --images 256 --sd-images 64 --repeats 3 --shadow-steps 50
    python bench/bench_mia.py --skip-shadow --threads 1         # scoring only, one core

1. Scoring, on two models: the shipped demo (`demo/models/demo-text`: pixel_text, 32x32, conditioned on
   each logo's caption) and a tiny random Stable Diffusion 1.x layout at 512 px (`memex.tiny.build_sd15`:
   latent_text, a real 8x VAE to 64x64x4 latents, cross-attention only at the UNet's 16x16 level).
   Demo images: the first --images/2 of its training pictures (training_manifest.parquet, one row per
   picture) and of demo/data/heldout.parquet; SD: --sd-images synthetic logos rendered at 512 px
   (memex.synth.logo), PNG-encoded. For each attack (loss, pia, secmi) alone, and for the three in one
   score() call ("all 3": what the stage runs, one preprocessing, VAE encode and caption embedding per
   batch for all 18 UNet calls), alternating --repeats times after a warm-up, medians printed as images/s:
     memex  MiaScorer(model, MiaSettings(batch_size=--batch)).score(ids, images, captions, attacks) on
            decoded uint8 images: preprocessing (images.fit), VAE encode (latent models), caption
            embeddings, seeded noise (loss), the attack's UNet calls, padding of the last batch.
     bound  the UNet alone: as many forward passes as memex makes (ceil(N / batch) x calls per batch:
            draws for loss, 2 for PIA, secmi_k + 2 for SecMI) on the same (batch, C, h, w) shape and the
            same (batch, L, D) caption embeddings, under no_grad; no VAE, no preprocessing, no noise.
   Then one instrumented run per attack (timers on this scorer's UNet forward, VAE encode, images.fit
   preprocessing, caption embedding and noise; memex code untouched) says where the time outside the
   UNet goes, and the PNG decode the stage adds before scoring (memex.ingest.decode_rows, as
   memex/stages/mia.py score_rows calls it) is timed on the same images.
2. Shadow models (LiRA): one shadow of the demo, exactly as `memex mia mia=lira` trains it
   (memex.stages.mia.train_and_score_shadow, in this process, into a temporary storage root): the
   target's recipe (memex_train.json) with --shadow-steps steps on its half of the 256 + 256 demo images
   (members repeated as often as the target saw them), saved, then its loss on all 512 images.
   memex.training.train's own per-step time (its last log line, loop only) gives seconds per step;
   the rest of the task (reading the data, saving, scoring) is fixed per shadow. Printed: the implied
   shadows per hour at --at-steps training steps (default: 300, the README's `mia.shadow_steps=300`;
   3,643, the mean of the demo's 4 shadows with mia.shadow_steps unset: the target's 5,000 steps x a
   half's rows / its 560 rows, memex.stages.mia.shadow_steps).

--threads: torch threads (default 2). On cores another job holds, 2 threads collapse (the shadow's
512 images scored in 312 s instead of 12 s with a test run on the other core; bench/bench_sampler.py
saw the same): run it idle, or with --threads 1 (180 s for the default run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from timing import elapsed, timers  # bench/timing.py: the scripts run from bench/

import memex.mia as mia_mod
from memex import synth, tiny
from memex.config import (
    ImageSetConfig,
    MiaConfig,
    MiaSettings,
    ModelConfig,
    ResourcesConfig,
    StorageConfig,
)
from memex.images import encode_png
from memex.ingest import decode_rows
from memex.mia import MiaScorer, shadow_splits
from memex.models import load_model

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo/models/demo-text"
HELDOUT = REPO / "demo/data/heldout.parquet"
ATTACKS = ("loss", "pia", "secmi")
ALL = "all 3"  # the three in one score() call, as the stage runs them: one preprocessing per batch




def calls_per_batch(attack: str, s: MiaSettings) -> int:
    calls = {"loss": s.draws, "pia": 2, "secmi": s.secmi_k + 2}
    return sum(calls.values()) if attack == ALL else calls[attack]


def attack_list(attack: str) -> list[str]:
    return list(ATTACKS) if attack == ALL else [attack]


# ---- inputs ----------------------------------------------------------------------------------------
def demo_rows(n: int) -> pa.Table:
    """id, image (PNG bytes), caption: n/2 demo training pictures then n/2 held-out logos."""
    m = pq.read_table(DEMO / "training_manifest.parquet")
    m = m.filter(pa.compute.equal(m["id"], m["source_id"])).select(["id", "image", "caption"])
    h = pq.read_table(HELDOUT).select(["id", "image", "caption"])
    return pa.concat_tables([m.slice(0, n - n // 2), h.slice(0, n // 2)])


def logo_rows(n: int, size: int) -> pa.Table:
    rows = [synth.logo(i, size, 0) for i in range(n)]
    return pa.table({"id": [f"logo-{i:04d}" for i in range(n)], "image": [encode_png(r[0]) for r in rows],
                     "caption": [r[1] for r in rows]})


def decode(rows: pa.Table):
    return decode_rows(rows.append_column("uri", pa.nulls(rows.num_rows, pa.string())), None)


# ---- 1. scoring vs the UNet-only bound ------------------------------------------------------------
@torch.no_grad()
def bound_loop(unet, n_forwards: int, x: torch.Tensor, cond: torch.Tensor | None, t: int) -> None:
    ts = torch.full((x.shape[0],), t, dtype=torch.long, device=unet.device)
    kw = {} if cond is None else {"encoder_hidden_states": cond}
    for _ in range(n_forwards):
        unet(x, ts, **kw)


@contextlib.contextmanager
def instrumented(scorer: MiaScorer, device: str):
    """Timers around this scorer's parts (instance attributes shadow the methods; memex.mia's module-level
    to_model_images swapped for the run): key -> [seconds, calls]."""
    acc, timed = timers(device)

    targets = [(scorer.unet, "forward", "UNet forward"), (scorer, "_embed", "caption embeddings"),
               (scorer, "noise", "noise (seeded, CPU)")]
    if scorer.vae is not None:
        targets.append((scorer.vae, "encode", "VAE encode"))
    for obj, name, key in targets:
        setattr(obj, name, timed(getattr(obj, name), key))
    fit = mia_mod.to_model_images
    mia_mod.to_model_images = timed(fit, "preprocess (images.fit)")
    try:
        yield acc
    finally:
        mia_mod.to_model_images = fit
        for obj, name, _ in targets:
            delattr(obj, name)


def score_model(label: str, path: str, rows: pa.Table, a) -> dict:
    model = load_model(path, device=a.device)
    settings = MiaSettings(batch_size=a.batch)
    scorer = MiaScorer(model, settings)
    decoded = decode(rows)
    ids, images = decoded.ids, decoded.images
    caps = dict(zip(rows["id"].to_pylist(), rows["caption"].to_pylist()))
    captions = [caps[i] for i in ids]
    n, bs = len(ids), a.batch
    n_batches = math.ceil(n / bs)

    # bound inputs: the UNet's input shape at batch bs, the first batch's caption embeddings
    unet = scorer.unet
    side = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    x = torch.randn(bs, unet.config.in_channels, side, side, device=unet.device, dtype=unet.dtype)
    with torch.no_grad():
        cond = scorer._embed([captions[i % n] for i in range(bs)]) if scorer.conditional else None
    t = {"loss": settings.loss_timestep, "pia": settings.pia_timestep, "secmi": settings.secmi_timestep,
         ALL: settings.loss_timestep}

    res = {}
    for attack in (*ATTACKS, ALL):
        which = attack_list(attack)
        n_fwd = n_batches * calls_per_batch(attack, settings)
        before = scorer.unet_evaluations
        scorer.score(ids[:1], images[:1], captions[:1], which)  # warm-up
        assert scorer.unet_evaluations - before == calls_per_batch(attack, settings) * bs
        bound_loop(unet, 1, x, cond, t[attack])
        times = defaultdict(list)
        for _ in range(a.repeats):
            before = scorer.unet_evaluations
            times["memex"].append(elapsed(lambda: scorer.score(ids, images, captions, which), a.device))
            assert scorer.unet_evaluations - before == n_fwd * bs  # the bound makes the same passes
            times["bound"].append(elapsed(lambda: bound_loop(unet, n_fwd, x, cond, t[attack]), a.device))
        med = {k: statistics.median(v) for k, v in times.items()}
        probe = MiaScorer(model, settings)
        with instrumented(probe, a.device) as acc:
            total = elapsed(lambda: probe.score(ids, images, captions, which), a.device)
        res[attack] = {"n_fwd": n_fwd, "memex": med["memex"], "bound": med["bound"], "total": total,
                       "parts": {k: v[0] for k, v in acc.items()}}
    png = statistics.median(elapsed(lambda: decode(rows), a.device) for _ in range(a.repeats))
    kind = model.kind.value
    shape = f"{scorer.size}x{scorer.size}x{scorer.channels} -> UNet {unet.config.in_channels}x{side}x{side}"
    print(f"\n{label}: {kind} {shape}; N={n} images, batch {bs} ({n_batches * bs - n} padding rows), "
          f"draws {settings.draws}, secmi_k {settings.secmi_k}")
    print(f"{'attack':<7} {'UNet fwd':<11} {'evals/img':>9} {'memex img/s':>11} {'bound img/s':>11} "
          f"{'memex/bound':>11}  {'memex s':>7} {'bound s':>7}")
    for attack, r in res.items():
        print(f"{attack:<7} {r['n_fwd']:>5} x {bs:<3} {r['n_fwd'] * bs / n:>9.1f} {n / r['memex']:>11.2f} "
              f"{n / r['bound']:>11.2f} {r['bound'] / r['memex']:>11.2f}  {r['memex']:>7.2f} {r['bound']:>7.2f}")
    keys = ["UNet forward", "VAE encode", "preprocess (images.fit)", "caption embeddings", "noise (seeded, CPU)"]
    print("where memex's time goes (one instrumented run per attack), share of its total:")
    print(f"  {'attack':<7} {'total s':>7} " + " ".join(f"{k.split(' (')[0][:13]:>13}" for k in keys) +
          f" {'rest':>7}")
    for attack, r in res.items():
        rest = r["total"] - sum(r["parts"].values())
        cells = " ".join(f"{100 * r['parts'].get(k, 0) / r['total']:>12.1f}%" if k in r["parts"] else f"{'-':>13}"
                         for k in keys)
        print(f"  {attack:<7} {r['total']:>7.2f} {cells} {100 * rest / r['total']:>6.1f}%")
    print(f"  PNG decode the stage adds first (decode_rows, {n} images): {png:.3f}s = "
          f"{1000 * png / n:.2f} ms/image, {100 * png / res[ALL]['memex']:.1f}% of scoring all 3")
    return res


# ---- 2. shadow models -------------------------------------------------------------------------------
def shadow(a, loss_rate: float | None) -> None:
    from memex.layout import MiaLayout
    from memex.stages import mia as stage

    recipe = stage.shadow_recipe(str(DEMO))
    images = pa.concat_tables([stage.read_image_set(str(DEMO / "training_manifest.parquet"), "caption", True, {},
                                                    "members.path"),
                               stage.read_image_set(str(HELDOUT), "caption", False, {}, "nonmembers.path")])
    inside = shadow_splits(images["image_id"].to_pylist(), 2, 0)[0]
    root = tempfile.mkdtemp(prefix="bench-mia-")
    cfg = MiaConfig(model=ModelConfig(name="demo", path=str(DEMO)), members=ImageSetConfig(path="m"),
                    nonmembers=ImageSetConfig(path="n"), storage=StorageConfig(root=root),
                    resources=ResourcesConfig(device=a.device),
                    mia=MiaSettings(shadow_models=2, shadow_steps=a.shadow_steps))
    layout = MiaLayout(root, "bench")
    layout.store.write_table(layout.images_path, images)

    import memex.training as training

    parts: dict[str, float] = {}
    loop: list[float] = []
    train, score = training.train, MiaScorer.score

    class StepTime(logging.Handler):  # memex.train's "step %d/%d loss %.4f (%.2f s/step)": loop time only
        def emit(self, record):
            if "s/step" in record.msg:
                loop.append(float(record.args[3]))

    def timed_train(*args, **kw):
        t0 = time.perf_counter()
        out = train(*args, **kw)
        parts["train"] = time.perf_counter() - t0
        return out

    def timed_score(self, *args, **kw):
        t0 = time.perf_counter()
        out = score(self, *args, **kw)
        parts["score"] = parts.get("score", 0.0) + time.perf_counter() - t0
        return out

    handler, logger = StepTime(), logging.getLogger("memex.train")
    logger.addHandler(handler)
    old = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the training's log lines: not on the console
    training.train, MiaScorer.score = timed_train, timed_score
    try:
        t0 = time.perf_counter()
        rows = sum(max(1, c or 1) for c, i in zip(images["copies"].to_pylist(), inside) if i)
        _, meta = stage.train_and_score_shadow(0, cfg, "bench", recipe, inside.tolist(),
                                               stage.shadow_steps(recipe, rows, cfg.mia.shadow_steps))
        task = time.perf_counter() - t0
    finally:
        training.train, MiaScorer.score = train, score
        logger.removeHandler(handler)
        logger.setLevel(old[0])
        logger.propagate = old[1]
    steps = meta["training_steps"]
    per_step = loop[-1]
    fixed = task - steps * per_step
    info = json.loads((DEMO / "memex_train.json").read_text())
    print(f"\nshadow model (LiRA) of the demo: recipe {recipe['arch']['kind']} {recipe['arch']['resolution']} px, "
          f"batch {recipe['trainer']['batch_size']}; {meta['examples']} training examples "
          f"({int(inside.sum())} of {images.num_rows} images, members with their copies), {steps} steps, "
          f"then the loss ({cfg.mia.draws} draws) of all {images.num_rows} images")
    print(f"  train_and_score_shadow {task:.1f}s: memex.training.train {parts['train']:.1f}s "
          f"(loop {steps} x {per_step:.3f} s/step = {steps * per_step:.1f}s, setup + save "
          f"{parts['train'] - steps * per_step:.1f}s), loss scoring {parts['score']:.1f}s "
          f"({meta['unet_evaluations']} UNet evaluations), rest (data, copy to storage) "
          f"{task - parts['train'] - parts['score']:.1f}s")
    print(f"  the target itself: {info['steps']} steps in {info['train_seconds_this_run']:.0f}s when trained "
          f"({info['train_seconds_this_run'] / info['steps']:.3f} s/step, memex_train.json)")
    if loss_rate:
        print(f"  (the loss rate measured above, {loss_rate:.1f} img/s, predicts {images.num_rows / loss_rate:.1f}s "
              f"of scoring for {images.num_rows} images)")
    print(f"  {'steps':>6} {'s / shadow':>10} {'shadows/hour':>12} {'4 shadows, one at a time':>24} {'16 shadows':>10}")
    for s in a.at_steps:
        one = fixed + s * per_step
        print(f"  {s:>6} {one:>10.0f} {3600 / one:>12.2f} {4 * one / 60:>20.1f} min {16 * one / 3600:>8.2f} h")
    print(f"  (one shadow per process at {a.threads} torch threads; Ray runs the tasks side by side on free CPUs/GPUs)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32, help="demo images scored (half members, half held out)")
    p.add_argument("--sd-images", type=int, default=16, help="512 px images scored on the tiny SD layout")
    p.add_argument("--sd-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=MiaSettings().batch_size, help="mia.batch_size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shadow-steps", type=int, default=20)
    p.add_argument("--at-steps", type=int, nargs="+", default=[300, 3643])
    p.add_argument("--skip-sd", action="store_true")
    p.add_argument("--skip-shadow", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import diffusers.utils.logging as dl

        dl.disable_progress_bar()
    print(f"bench_mia: threads={a.threads} device={a.device} repeats={a.repeats} (medians), torch {torch.__version__}")
    t0 = time.perf_counter()
    res = score_model(f"demo ({DEMO.relative_to(REPO)})", str(DEMO), demo_rows(a.images), a)
    if not a.skip_sd:
        folder = tiny.build_sd15(Path(tempfile.mkdtemp(prefix="bench-mia-sd-")) / "sd15", image_size=a.sd_size)
        score_model(f"tiny SD 1.x layout (memex.tiny.build_sd15, {a.sd_size} px)", str(folder),
                    logo_rows(a.sd_images, a.sd_size), a)
    if not a.skip_shadow:
        shadow(a, a.images / res["loss"]["memex"])
    print(f"\nwhole run: {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
