"""triage=preview's sampler actor on one chunk at 512 px: the previews' PNGs held as one Python list until pa.table
copied them into Arrow (memex before) against each step's PNGs put into Arrow as they are encoded
(memex/stages/triage.py TriagePrompts, the column a ChunkedArray of the steps' arrays).

    python bench/bench_preview_memory.py                       # 16 prompts x 8 previews, 4 a step
    python bench/bench_preview_memory.py --prompts 32 --step 8
    python bench/bench_preview_memory.py --live                # each side samples on this CPU (slower)

The model: memex.tiny.build_sd15, Stable Diffusion 1.x's shapes at 512 px with tiny widths (its random previews
are noise-like: ~630 kB a PNG at level 1 against 786 kB raw; a real SD generation is ~420 kB, memex/images.py).
triage.steps=2 (the default 10 takes 5x the UNet time for the same PNGs). A step is --step previews: sampling.
batch_size = shard_size = --step, so the chunk is prompts x 8 / step steps (the default chunk: 2,048 previews in
32 steps of 64).

Each side is the real worker (TriagePrompts, or the "before" copy of it below) in a fresh subprocess: built (the
model loaded), then one prompt's previews as a warm-up; memory is its peak RSS (VmHWM, reset by
/proc/self/clear_refs as bench/bench_match_memory.py's peak_from_here) above its RSS then, over the chunk's call,
which returns the table (both sides' tables are asserted equal, row for row). The chunk's previews are sampled
once by the real sampler before the sides start, and each side's sampler.generate hands out copies of its rows:
on a GPU actor the sampler's transients are in GPU memory, but on this CPU they add ~90 MB a step to RSS (the
VAE's mid-block attention over 64x64 latents: 4096^2 floats), the same on both sides, above the held PNGs
(--live keeps them, and the sampling time). glibc's mmap threshold is fixed at 128 kB in the sides
(MALLOC_MMAP_THRESHOLD_), so memory freed (a step's bytes, the sampler's buffers) leaves RSS at once: the
peak counts what is held, not where glibc's heap happened to be.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SEEDS = 8  # triage.seeds: previews a prompt (conf/triage/preview.yaml)


def config(folder: str, prompts: int, step: int):
    from memex import config as c

    return c.AuditConfig(model=c.ModelConfig(path=f"{folder}/sd15", name="tiny-sd15"),
                         sampling=c.SamplingConfig(batch_size=step, shard_size=step, decode_batch_size=1,
                                                   guidance_scale=7.5),
                         prompts=c.PromptsConfig(source=c.PromptSource.file, path=f"{folder}/prompts.txt"),
                         storage=c.StorageConfig(root=f"{folder}/runs"),
                         resources=c.ResourcesConfig(executor=c.ExecutorKind.local, device="cpu"),
                         triage=c.TriageConfig(kind=c.TriageKind.preview, seeds=SEEDS, steps=2,
                                               prompts_per_task=prompts))


def make_inputs(folder: Path, prompts: int, step: int) -> str:
    """The tiny SD 1.x model (folder/sd15) and a prepared run of `prompts` prompts; returns the run's name."""
    from memex import tiny
    from memex.stages import generate

    tiny.build_sd15(folder / "sd15", image_size=512)
    # short: the tiny tokenizer keeps 14 characters, and prompts equal within them are one
    (folder / "prompts.txt").write_text("\n".join(f"thing {i}" for i in range(prompts)))
    return generate.prepare(config(str(folder), prompts, step))


def before_worker():
    """TriagePrompts with the preview branch of its __call__ as it was (labelled "before"): every PNG of the chunk
    in one Python list, copied into Arrow by pa.table at the end."""
    import pyarrow as pa

    from memex.images import encode_png
    from memex.layout import PREVIEWS_SCHEMA
    from memex.plan import tie_shard_size
    from memex.sampling import sample_seed
    from memex.stages.triage import TriagePrompts

    class Before(TriagePrompts):
        def __call__(self, index: int, p0: int, p1: int) -> tuple[pa.Table, dict]:
            t, s = self.cfg.triage, self.cfg.sampling
            ids, texts = self.prompt_ids[p0:p1], self.prompts[p0:p1]
            rows_ids = [pid for pid in ids for _ in range(t.seeds)]
            rows_texts = [p for p in texts for _ in range(t.seeds)]
            index_of = [j % t.seeds for j in range(len(rows_ids))]
            seeds = [sample_seed(s.seed, pid, i) for pid, i in zip(rows_ids, index_of)]
            before, padded = self.sampler.unet_evaluations, self.sampler.padded_evaluations
            step, png = tie_shard_size(s.shard_size, s.batch_size), []
            for j in range(0, len(rows_ids), step):
                images = self.sampler.generate(rows_ids[j:j + step], rows_texts[j:j + step], seeds[j:j + step])
                png += [encode_png(x, s.png_compress_level) for x in images]
            table = pa.table({"prompt_id": rows_ids, "prompt": rows_texts, "sample_index": index_of, "image": png},
                             schema=PREVIEWS_SCHEMA)
            return table, self._cost(before, padded)

    return Before


def sample_chunk(folder: str, run: str, prompts: int, step: int) -> None:
    """The chunk's previews by the real sampler, as the worker asks for them: folder/previews.npy (N, 512, 512, 3)
    and folder/seeds.json (the seed of each row)."""
    import numpy as np
    import torch

    from memex.stages.triage import TriagePrompts

    torch.set_num_threads(2)
    worker, asked = TriagePrompts(config(folder, prompts, step), run), []
    generate = worker.sampler.generate

    def keep(ids, texts, seeds):
        asked.append((list(seeds), generate(ids, texts, seeds)))
        return asked[-1][1]

    worker.sampler.generate = keep
    worker(0, 0, prompts)
    np.save(f"{folder}/previews.npy", np.concatenate([x for _, x in asked]))
    Path(folder, "seeds.json").write_text(json.dumps([s for seeds, _ in asked for s in seeds]))


def side(kind: str, folder: str, run: str, prompts: int, step: int, live: bool) -> None:
    """One worker in this process: writes its table to folder/<kind>.parquet, prints a JSON line."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from bench_match_memory import peak_from_here

    from memex.stages.triage import TriagePrompts

    torch.set_num_threads(2)
    worker = (before_worker() if kind == "before" else TriagePrompts)(config(folder, prompts, step), run)
    if not live:  # the real sampler's previews, sampled before (sample_chunk): copies of the rows asked for
        previews = np.load(f"{folder}/previews.npy")
        row = {s: j for j, s in enumerate(json.loads(Path(folder, "seeds.json").read_text()))}
        worker.sampler.generate = lambda ids, texts, seeds: previews[[row[s] for s in seeds]]
    worker(0, 0, 1)  # one prompt's previews: the sampler's buffers and the allocators' pools as in a chunk
    peak = peak_from_here()
    arrow0 = pa.total_allocated_bytes()
    t0 = time.perf_counter()
    table, _ = worker(0, 0, prompts)
    seconds = time.perf_counter() - t0
    out = {"peak_mib": peak(), "seconds": seconds, "arrow_mib": (pa.total_allocated_bytes() - arrow0) / 2**20,
           "rows": table.num_rows, "png_mib": table["image"].nbytes / 2**20,
           "png_kb": sum(len(b) for b in table["image"].to_pylist()) / table.num_rows / 1e3,
           "chunks": table["image"].num_chunks}
    pq.write_table(table, f"{folder}/{kind}.parquet", compression="zstd")
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="prompts in the chunk (triage.prompts_per_task)")
    ap.add_argument("--step", type=int, default=4, help="previews a step (sampling.batch_size = shard_size)")
    ap.add_argument("--live", action="store_true", help="each side samples its previews (adds the CPU sampler's "
                    "~90 MB a step to both peaks)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side(a.side, a.folder, a.run, a.prompts, a.step, a.live)
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        run = make_inputs(Path(tmp), a.prompts, a.step)
        t0 = time.perf_counter()
        if not a.live:
            sample_chunk(tmp, run, a.prompts, a.step)
        sampled, out = time.perf_counter() - t0, {}
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
        for kind in ("before", "memex"):
            r = subprocess.run([sys.executable, __file__, "--side", kind, "--folder", tmp, "--run", run, "--prompts",
                                str(a.prompts), "--step", str(a.step), *(["--live"] if a.live else [])],
                               capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"{kind} failed:\n{r.stderr[-3000:]}")
            out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        same = pq.read_table(f"{tmp}/before.parquet").equals(pq.read_table(f"{tmp}/memex.parquet"))
        assert same, "the two sides returned different tables"
    o = out["memex"]
    print(f"one chunk: {a.prompts} prompts x {SEEDS} previews = {o['rows']} at 512 px in steps of {a.step} "
          f"({o['chunks']} Arrow chunks); PNGs {o['png_mib']:.0f} MiB, {o['png_kb']:.0f} kB each "
          f"(raw {512 * 512 * 3 / 1e3:.0f} kB: {512 * 512 * 3 / 1e3 / o['png_kb']:.2f}x smaller); "
          + ("each side samples them" if a.live else f"sampled once before the sides, in {sampled:.0f} s"))
    print(f"{'side':<7} {'peak RSS MiB above start':>25} {'arrow MiB at return':>20} {'seconds':>8}")
    for kind, o in out.items():
        print(f"{kind:<7} {o['peak_mib']:>25.0f} {o['arrow_mib']:>20.0f} {o['seconds']:>8.1f}")
    b, m = out["before"], out["memex"]
    print(f"before / memex: {b['peak_mib'] / m['peak_mib']:.2f}x the peak RSS; peak above the PNGs: before "
          f"{b['peak_mib'] - b['png_mib']:.0f} MiB, memex {m['peak_mib'] - m['png_mib']:.0f} MiB; "
          f"{b['seconds'] / m['seconds']:.2f}x the time; equal tables")


if __name__ == "__main__":
    main()
