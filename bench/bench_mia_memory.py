"""`memex mia`'s workers at LAION-like image sizes: a scoring actor and a LiRA shadow task holding every image's
bytes (memex before) against reading their own rows of images.parquet (memex/stages/mia.py read_image_rows).

    python bench/bench_mia_memory.py                           # 3,000 images of ~100 KB
    python bench/bench_mia_memory.py --images 4000 --units 2 --per 256

images.parquet (MIA_IMAGES_SCHEMA): --images PNGs of noise, 184x184 (~100 KB encoded, as a LAION image,
and about as much decoded: decoding a unit, the same on both sides, stays small beside the bytes held),
half members, written as the stage writes it (mia.images_per_unit = --per rows a row group). The model:
a tiny unconditional one `memex train` makes here in 2 steps (8x8 pixels: its memory is negligible). Each
side runs the real worker in a fresh subprocess; memory is its peak RSS (VmHWM, reset by
/proc/self/clear_refs) above its RSS before the worker is built (imports and one model load done), and
the sides must return equal tables (asserted):
  actor   ScoreImages built, then --units units of --per images scored (the loss attack, 1 draw), as one actor of a
          pool does. plain: the actor reads all of images.parquet when built and slices its units from it
          (the code before); memex: each unit reads its own rows.
  shadow  train_and_score_shadow(0, ...): 2 training steps on its half, then its loss on every image.
          plain: the task's rows come from all of images.parquet read at its start and held (the code
          before, which also copied the half's bytes twice more, filtered and as the manifest's lists: plain
          understates it); memex: --per rows at a time. Both sides hold the half once more while
          `memex train` loads its data (memex/training.py load_training_set).
At 50,000 LAION images of ~100 KB the plain side holds ~5 GB per actor and per shadow task.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SIDE = 184  # noise PNGs of 184x184 RGB: ~100 KB encoded, and about as much decoded


def make_inputs(folder: Path, n: int, per: int, seed: int = 0) -> float:
    """The tiny target model (folder/model) and images.parquet of run "inputs"; returns its MB of image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memex import synth
    from memex.config import ArchConfig, ArchKind, DataConfig, TrainConfig, TrainerConfig
    from memex.images import encode_png
    from memex.layout import MIA_IMAGES_SCHEMA, MiaLayout
    from memex.training import train

    logos = [synth.logo(i, 8, 0)[0] for i in range(8)]
    pq.write_table(pa.table({"id": [f"l{i}" for i in range(8)], "image": [encode_png(x) for x in logos]}),
                   folder / "train.parquet")
    train(TrainConfig(arch=ArchConfig(kind=ArchKind.unconditional, resolution=8, block_out_channels=[8, 16],
                                      attention_levels=0), data=DataConfig(path=str(folder / "train.parquet")),
                      trainer=TrainerConfig(steps=2, batch_size=8, warmup_steps=1, checkpoint_every=2, log_every=2),
                      output=str(folder / "model")))
    rng = np.random.default_rng(seed)
    # 64 distinct pictures of noise, each row its own copy of one's bytes (as Arrow holds any table's)
    distinct = [encode_png(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(64)]
    pngs = [distinct[k % len(distinct)] for k in range(n)]
    images = pa.table({"image_id": [f"img-{k:06d}" for k in range(n)], "member": [k % 2 == 0 for k in range(n)],
                       "image": pa.array(pngs, pa.binary()), "uri": pa.nulls(n, pa.string()),
                       "caption": pa.nulls(n, pa.string()), "copies": pa.nulls(n, pa.int32())},
                      schema=MIA_IMAGES_SCHEMA)
    layout = MiaLayout(str(folder / "runs"), "inputs")
    layout.store.write_table(layout.images_path, images, row_group_size=per)  # as the stage writes it
    return sum(map(len, pngs)) / 2**20


def config(folder: str, name: str, per: int):
    from memex import config as c

    return c.MiaConfig(model=c.ModelConfig(name="tiny", path=f"{folder}/model"), members=c.ImageSetConfig(path="m"),
                       nonmembers=c.ImageSetConfig(path="n"), storage=c.StorageConfig(root=f"{folder}/runs"),
                       resources=c.ResourcesConfig(device="cpu"),
                       mia=c.MiaSettings(attacks=[c.MiaAttack.loss], draws=1, batch_size=64, images_per_unit=per,
                                         preprocess=c.Preprocess.resize, shadow_models=2, shadow_steps=2))


def peak_from_here() -> None:
    """The peak RSS counted from now (Linux: /proc/self/clear_refs 5 resets VmHWM): the imports' and the model
    load's transient peaks before are not the worker's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def side(work: str, kind: str, folder: str, per: int, units: int) -> None:
    """One worker in this process: writes its table to folder/<work>-<kind>.parquet, prints a JSON line."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from bench_match_memory import rss_mib

    from memex.layout import MIA_IMAGES_SCHEMA, MiaLayout
    from memex.stages import mia

    torch.set_num_threads(1)
    name = f"{work}-{kind}"  # a run folder of its own (a shadow writes its data and model there)
    layout = MiaLayout(f"{folder}/runs", name)
    inputs, copy = MiaLayout(f"{folder}/runs", "inputs"), Path(layout.store.uri_of(layout.images_path))
    copy.parent.mkdir(parents=True)
    shutil.copy(inputs.store.uri_of(inputs.images_path), copy)  # (a streamed copy: nothing held)
    cfg = config(folder, name, per)
    n = pq.read_metadata(layout.store.uri_of(layout.images_path)).num_rows
    # the libraries a worker has loaded before its images matter (diffusers: a ~0.6 GB peak), not measured
    import accelerate  # noqa: F401 - memex train's
    import diffusers  # noqa: F401

    import memex.training  # noqa: F401
    from memex.models import load_model

    load_model(cfg.model.path, device="cpu")
    peak_from_here()
    base = rss_mib()
    t0 = time.perf_counter()
    if work == "actor":
        class Plain(mia.ScoreImages):  # the code before: every image's bytes read when the actor is built
            def __init__(self, cfg, run_name):
                super().__init__(cfg, run_name)
                self.images = self.layout.store.read_table(self.layout.images_path, schema=MIA_IMAGES_SCHEMA)

            def __call__(self, index, start, stop):
                return mia.score_rows(self.scorer, self.images.slice(start, stop - start), ["loss"], {})

        actor = (Plain if kind == "plain" else mia.ScoreImages)(cfg, name)
        table = pa.concat_tables([actor(i, i * per, min((i + 1) * per, n))[0] for i in range(units)])
    else:
        if kind == "plain":  # the code before: the task read every image's bytes at its start, and held them
            whole = layout.store.read_table(layout.images_path, schema=MIA_IMAGES_SCHEMA)
            mia.read_image_rows = lambda store, path, a, b: whole.slice(a, b - a)
        inside = mia.splits_of([f"img-{k:06d}" for k in range(n)], {}, 2, 0)[0].tolist()
        table, _ = mia.train_and_score_shadow(0, cfg, name, mia.shadow_recipe(cfg.model.path), inside, 2)
        data = pq.read_table(layout.store.uri_of(layout.shadow_data(0)))
        table = table.append_column("data_rows", pa.array([data.num_rows] * table.num_rows))
    seconds = time.perf_counter() - t0
    peak = peak_mib()
    pq.write_table(table, f"{folder}/{name}.parquet")
    print(json.dumps({"seconds": seconds, "peak_mib": peak - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000, help="members + non-members in images.parquet")
    ap.add_argument("--per", type=int, default=256, help="mia.images_per_unit")
    ap.add_argument("--units", type=int, default=2, help="units the actor scores")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side(a.work, a.side, a.folder, a.per, a.units)
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        mb = make_inputs(Path(tmp), a.images, a.per)
        print(f"images.parquet: {a.images} images, {SIDE}x{SIDE} PNG ({mb:.0f} MB encoded, "
              f"{mb * 1024 / a.images:.0f} KB each), mia.images_per_unit={a.per}; an actor scores {a.units} units "
              "(loss, 1 draw), a shadow trains 2 steps on its half and scores every image")
        out = {}
        for work in ("actor", "shadow"):
            for kind in ("plain", "memex"):
                r = subprocess.run([sys.executable, __file__, "--side", kind, "--work", work, "--folder", tmp,
                                    "--per", str(a.per), "--units", str(a.units)], capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"{work} {kind} failed:\n{r.stderr[-3000:]}")
                out[work, kind] = json.loads(r.stdout.strip().splitlines()[-1])
            same = pq.read_table(f"{tmp}/{work}-plain.parquet").equals(pq.read_table(f"{tmp}/{work}-memex.parquet"))
            assert same, f"the {work} sides returned different tables"
    print(f"{'worker':<7} {'side':<6} {'peak MiB above start':>21} {'seconds':>8}")
    for (work, kind), o in out.items():
        print(f"{work:<7} {kind:<6} {o['peak_mib']:>21.0f} {o['seconds']:>8.1f}")
    for work in ("actor", "shadow"):
        p, m = out[work, "plain"], out[work, "memex"]
        ratio, speed = m["peak_mib"] / p["peak_mib"], p["seconds"] / m["seconds"]
        print(f"{work}: memex / plain {ratio:.2f}x the memory ({1 / ratio:.1f}x less), {speed:.2f}x the speed, "
              "equal tables")


if __name__ == "__main__":
    main()
