"""The paper's scale on CPU: one prompt x N samples of a 512x512 Stable Diffusion-layout model
through generate -> filter -> match, with wall time per stage and peak memory.

    python bench/bench_scale.py                      # N = 250, 500, 1000 at 10 steps
    python bench/bench_scale.py --samples 500 --steps 50

Model: memex.tiny.build_sd15 (SD 1.x shapes: 8x VAE, 64x64x4 latents, PNDM as SD 1.5 ships it,
cross-attention at 16x16 only). Training set: 64 LAION-style 512x768 pictures plus 2 whose centre
512x512 crop is one of the run's own generations (planted from the same seeds), so match has
copies to find through trainset.preprocess=center_crop. The filter runs the paper's 500-sample
clique search; match verifies every generation (match.candidates=all, tiled l2), the heaviest
case. Each N runs in a fresh subprocess with its own local Ray, so peaks do not carry over:
  driver  peak RSS of the process that runs the stages (resource.getrusage), which includes the
          bench's own setup (a Sampler in the driver makes the planted copies); so also the driver's
          RSS while each stage ran (sampled every 0.2 s), and the peak before the stages (setup);
  workers peak RSS of the largest Ray worker and of all workers together while each stage ran
          (psutil, sampled every 0.2 s).
Prints a table, then the ratios that matter: filter time / generation time, the filter's worker
memory, and driver memory at N against the smallest N (flat in sample count).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _smooth(h: int, w: int, rng) -> np.ndarray:
    from PIL import Image

    coarse = rng.integers(0, 256, (h // 64, w // 64, 3)).astype(np.uint8)
    return np.array(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))  # a writable copy


class Peaks(threading.Thread):
    """Samples the RSS of this process (the driver) and of its Ray workers (children named ray::*) every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.me, self.stop, self.stage = psutil.Process(), threading.Event(), "start"
        self.peaks: dict[str, dict[str, float]] = {}

    def run(self):
        while not self.stop.is_set():
            rss = []
            for p in self.me.children(recursive=True):
                try:
                    if p.name().startswith("ray::") or "default_worker" in " ".join(p.cmdline()[:3]):
                        rss.append(p.memory_info().rss)
                except Exception:  # noqa: BLE001 - a worker may exit between listing and reading
                    continue
            pk = self.peaks.setdefault(self.stage, {"worker_max": 0.0, "workers_total": 0.0, "driver": 0.0})
            pk["driver"] = max(pk["driver"], self.me.memory_info().rss / 2**20)
            pk["worker_max"] = max(pk["worker_max"], max(rss, default=0) / 2**20)
            pk["workers_total"] = max(pk["workers_total"], sum(rss) / 2**20)
            time.sleep(0.2)


def _worker_rss() -> float:
    """RSS (MiB) of a Ray worker that has imported what the filter imports: the baseline its peak is over."""
    import psutil
    import torch  # noqa: F401

    import memex.stages.filter  # noqa: F401

    return psutil.Process().memory_info().rss / 2**20


def one(n: int, steps: int, root: Path) -> dict:
    """Index, generate, filter and match one prompt x n samples; returns times and peaks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memex import runner, tiny
    from memex.config import (
        AuditConfig,
        CandidateSource,
        IndexConfig,
        MatchConfig,
        ModelConfig,
        ModelKind,
        PromptsConfig,
        PromptSource,
        ResourcesConfig,
        RunConfig,
        SamplingConfig,
        StorageConfig,
        TrainingDataConfig,
    )
    from memex.images import encode_png
    from memex.layout import PROMPTS_SCHEMA
    from memex.models import load_model
    from memex.prompts import prompt_id
    from memex.sampling import Sampler, sample_seed
    from memex.stages import filter as filter_stage
    from memex.stages import generate, index, match
    from memex.storage import Store

    model = root / "sd15-tiny"
    if not (model / "model_index.json").exists():
        tiny.build_sd15(model)
    prompt = "a photo of the planted logo"
    sampling = SamplingConfig(samples_per_prompt=n, batch_size=8, num_inference_steps=steps, guidance_scale=7.5,
                              shard_size=100)
    # the training set: 64 unrelated 512x768 pictures + 2 whose centre crop is generation 0 / 1
    rng = np.random.default_rng(0)
    pid = prompt_id(prompt)
    planted = Sampler(load_model(str(model)), sampling).generate([pid] * 2, [prompt] * 2,
                                                                 [sample_seed(0, pid, i) for i in (0, 1)])
    images, ids = [], []
    for i, g in enumerate(planted):
        tall = _smooth(768, 512, rng)
        tall[128:640] = g
        images.append(encode_png(tall))
        ids.append(f"planted-{i}")
    for j in range(64):
        images.append(encode_png(_smooth(768, 512, rng)))
        ids.append(f"laion-{j:02d}")
    manifest = root / "train.parquet"
    pq.write_table(pa.table({"id": ids, "image": images, "caption": [prompt] * 2 + ["other"] * 64}), manifest)

    cfg = AuditConfig(model=ModelConfig(name="sd15-tiny", path=str(model), kind=ModelKind.latent_text),
                      sampling=sampling, prompts=PromptsConfig(source=PromptSource.file, path="unused"),
                      storage=StorageConfig(root=str(root / "runs")), resources=ResourcesConfig(num_cpus=2),
                      run=RunConfig(name=f"scale-{n}"), trainset=TrainingDataConfig(path=str(manifest)),
                      index=IndexConfig(shards=2), match=MatchConfig(candidates=CandidateSource.all))
    setup_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the planted Sampler's peak and so on
    peaks = Peaks()
    peaks.start()
    times = {}

    def timed(stage: str, fn, *args):
        peaks.stage = stage
        t0 = time.perf_counter()
        out = fn(*args)
        times[stage] = time.perf_counter() - t0
        return out

    info = timed("index", index.run, cfg)
    base = runner.call_all(_worker_rss, [{}], cfg.resources)[0]
    run_name = generate.prepare(cfg, pa.table({"prompt_id": [pid], "prompt": [prompt]}, schema=PROMPTS_SCHEMA))
    store = Store(cfg.storage.root).child(run_name)
    store.write_json(store.join("index.json"), info.to_json())  # what `memex audit` records
    timed("generate", generate.run, cfg, run_name)
    timed("filter", filter_stage.run, cfg, run_name)
    summary = timed("match", match.run, cfg, run_name)
    peaks.stop.set()
    peaks.join()
    return {"n": n, "steps": steps, "times": times, "peaks": peaks.peaks, "worker_base_mib": base,
            "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "driver_setup_mib": setup_mib,
            "extracted": summary["extracted_train_ids"], "candidates_verified": summary["candidates_verified"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="+", default=[250, 500, 1000])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one N in this process
    ap.add_argument("--root", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.steps, Path(a.root))), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.samples:
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--steps", str(a.steps), "--root", tmp],
                                 capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"N={n} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[7:]))
            r = rows[-1]
            print(f"N={n}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["times"].items()), flush=True)
    print(f"\none prompt x N samples, 512x512, tiny SD-layout model, PNDM, {a.steps} steps, 2 CPU cores")
    print(f"{'N':>5} {'generate s':>10} {'filter s':>9} {'match s':>8} {'driver MiB':>10} {'setup MiB':>9} "
          f"{'match driver MiB':>16} {'filter worker MiB':>17} {'gen worker MiB':>14} {'match worker MiB':>16}  "
          "extracted")
    print("(driver MiB: the driver's peak RSS, setup included; setup MiB: its peak before the stages; match driver "
          "MiB: its RSS while match ran, where match verifies; worker MiB: peak RSS of the largest Ray worker (match: "
          "the neighbour search, which holds the index) while the "
          f"stage ran; an idle worker that has imported torch and memex holds {rows[0]['worker_base_mib']:.0f} MiB)")
    for r in rows:
        t, p = r["times"], r["peaks"]
        print(f"{r['n']:>5} {t['generate']:>10.1f} {t['filter']:>9.1f} {t['match']:>8.1f} "
              f"{r['driver_peak_mib']:>10.0f} {r['driver_setup_mib']:>9.0f} "
              f"{p.get('match', {}).get('driver', 0):>16.0f} "
              f"{p.get('filter', {}).get('worker_max', 0):>17.0f} {p.get('generate', {}).get('worker_max', 0):>14.0f} "
              f"{p.get('match', {}).get('worker_max', 0):>16.0f}  {','.join(r['extracted'])}")
    print("driver RSS by stage (MiB): " + "; ".join(
        f"N={r['n']} " + ", ".join(f"{s} {v['driver']:.0f}" for s, v in r["peaks"].items() if s != "start")
        for r in rows))
    base = rows[0]
    for r in rows:
        t = r["times"]
        extra = r["peaks"].get("filter", {}).get("worker_max", 0) - r["worker_base_mib"]
        ratio = r["driver_peak_mib"] / base["driver_peak_mib"]
        print(f"N={r['n']}: generation / filter = {t['generate'] / t['filter']:.1f}x; filter worker "
              f"{extra:.0f} MiB above an idle worker; driver peak {ratio:.2f}x that of N={base['n']}")


if __name__ == "__main__":
    main()
