"""`memex train`'s training set in memory: loading it (memex/training.py load_training_set) and hashing it for the
recipe (recipe), the code before against memex's, on the same manifest.

    python bench/bench_train_memory.py                      # 2,000 JPEGs, 256x256 (375 MiB as uint8)
    python bench/bench_train_memory.py --images 400 --size 256

The manifest: --images photo-like JPEGs (bench_match_memory.picture: a colour grid with grain) of --size px, a
text model's captions, at the model's resolution (no resize). Each side runs in a fresh subprocess: it imports
its training module, then loads the set and computes the recipe as `memex train` does before training; its
memory is the peak RSS (resource.getrusage) above its RSS once the imports are done, and recipe()'s own peak is
sampled (/proc/self/statm every 2 ms) above the RSS it starts at. Both must give the same recipe digest
(asserted: checkpoints and output folders of before still resume).
  plain  memex/training.py as of --old-ref (the code before): the decoded images as a list, np.stack's copy and
         two float32 temporaries, kept as float32; recipe() hashes a C-order float32 copy of the whole set
  memex  the working tree's: one uint8 array filled as images decode; recipe() converts and hashes 32 MiB of
         float32 at a time
Both sides also hold the manifest (memory-mapped Parquet: its pages count once read) and what loading allocates
beside the pixels (the expanded manifest, captions).

    python bench/bench_train_memory.py --captions 50000 --distinct 100    # the text encoder's embeddings
    python bench/bench_train_memory.py --expanded 100 --copies 40         # the expanded training manifest

--captions N: a text model's conditioning for N images sharing --distinct captions (COCO-like, ~60 characters),
at the default arch (max_length 48, text_hidden 64, 2 layers), each side in a fresh subprocess, its peak RSS
above its RSS once the tokenizer and encoder are built and have encoded two captions:
  plain  per_image_embeddings below (memex/training.py before): the tokenizer and encoder over one caption an
         image, all at once, every image's embedding kept
  memex  memex.training.encode_captions: the distinct captions, ENCODE_CHUNK at a time; their embeddings and an
         image -> caption index kept
Both sides' conditioning of every image must be equal (asserted: a digest of the per-image tensor).

--expanded N: N distinct 256x256 noise PNGs (~190 KB each, they do not compress) at arch.resolution 32, the first
--copies-scheduled: data.duplication=[{copies: --copies, count: N}]. Each side loads the set as `memex train` does
(load_training_set), then:
  plain  expand_duplicates(manifest) (memex/training.py before: every example's row, its image bytes included,
         held for the whole run), written at the end with one pq.write_table
  memex  the examples' ids held (load_training_set), the file written at the end by write_training_manifest
Held: RSS after the load (what the run keeps while it trains) above the base; peak: the whole run's. Both files
must read back as equal tables (asserted).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
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
sys.path.insert(0, str(REPO / "bench"))
OLD_REF = "f1a5f58"  # the last commit whose memex/training.py held the set as float32


def make_inputs(folder: Path, n: int, size: int, seed: int = 0) -> float:
    """folder/train.parquet; returns its MB of image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_match_memory import picture
    from PIL import Image

    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(picture(rng, size, size)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    pq.write_table(pa.table({"id": [f"t{k}" for k in range(n)], "image": pa.array(jpegs, pa.binary()),
                             "caption": [f"picture {k}" for k in range(n)]}), folder / "train.parquet")
    return sum(map(len, jpegs)) / 2**20


def _module(kind: str, folder: str):
    if kind == "memex":
        import memex.training as training

        return training
    spec = importlib.util.spec_from_file_location("training_before", f"{folder}/training_before.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def side(kind: str, folder: str, size: int) -> None:
    import pyarrow.parquet as pq
    from bench_match_memory import rss_mib

    from memex.config import ArchConfig, DataConfig, TrainConfig
    from memex.images import decode

    training = _module(kind, folder)
    cfg = TrainConfig(arch=ArchConfig(resolution=size), data=DataConfig(path=f"{folder}/train.parquet"),
                      output=f"{folder}/out-{kind}")
    # what loading imports on first use (the tokenizer's transformers, PIL's JPEG decoder), before the base
    training.check_captions_fit(["a", "b"], 48)
    with pq.ParquetFile(f"{folder}/train.parquet") as f:
        decode(next(f.iter_batches(batch_size=1, columns=["image"]))["image"][0].as_py())
    base = rss_mib()
    t0 = time.perf_counter()
    _, images, captions, example_image, _ = training.load_training_set(cfg)
    load_s = time.perf_counter() - t0
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = rss_mib()
    top, done = [held], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            top[0] = max(top[0], rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    digest = training.recipe(cfg, images, captions, example_image)["training_set_sha256"]
    recipe_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak - base, "load_peak_mib": load_peak - base, "held_mib": held - base,
                      "recipe_mib": max(top[0], rss_mib()) - held, "load_s": load_s, "recipe_s": recipe_s,
                      "dtype": str(images.dtype), "digest": digest}))


def per_image_embeddings(tokenizer, encoder, captions: list[str], max_length: int):
    """memex/training.py before: (every image's embedding then the empty caption's (N + 1, L, H), image -> row)."""
    import torch

    with torch.no_grad():
        tok = tokenizer(captions + [""], padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt")
        all_emb = encoder(tok.input_ids)[0]
    return all_emb, torch.arange(len(captions))


def captions_side(kind: str, n: int, distinct: int) -> None:
    import hashlib

    from bench_match_memory import rss_mib

    import memex.training as training
    from memex import tiny
    from memex.config import ArchConfig

    a = ArchConfig()
    caps = [f"a photograph of a city street with cars and people, view {k % distinct}" for k in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny.build_tokenizer(tmp, max_length=a.max_length)
    enc = tiny.build_text_encoder(len(tok), a.max_length, hidden=a.text_hidden, seed=0, layers=a.text_layers)
    encode = per_image_embeddings if kind == "plain" else training.encode_captions
    encode(tok, enc, ["a", "b"], a.max_length)
    base = rss_mib()
    t0 = time.perf_counter()
    emb, of = encode(tok, enc, caps, a.max_length)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = rss_mib()
    h = hashlib.sha256()
    for k in range(0, n, 4096):  # every image's conditioning, as training indexes it
        h.update(emb[of[k:k + 4096]].numpy().tobytes())
    h.update(emb[-1].numpy().tobytes())
    print(json.dumps({"peak_mib": peak - base, "held_mib": held - base, "kept_mib": emb.numel() * 4 / 2**20,
                      "s": seconds, "rows": len(emb), "digest": h.hexdigest()}))


def expanded_side(kind: str, folder: str, copies: int) -> None:
    import pyarrow.parquet as pq
    from bench_match_memory import rss_mib

    import memex.training as training
    from memex.config import ArchConfig, DataConfig, DuplicationGroup, TrainConfig
    from memex.manifest import expand_duplicates, read_manifest

    n = pq.ParquetFile(f"{folder}/train.parquet").metadata.num_rows
    cfg = TrainConfig(arch=ArchConfig(resolution=32),
                      data=DataConfig(path=f"{folder}/train.parquet",
                                      duplication=[DuplicationGroup(copies=copies, count=n)]),
                      output=f"{folder}/out-{kind}")
    training.check_captions_fit(["a", "b"], 48)  # what loading imports on first use, before the base
    base = rss_mib()
    examples, images, captions, example_image, _ = training.load_training_set(cfg)
    if kind == "plain":  # the code before: the expanded manifest, images and all, held from the load on
        examples = expand_duplicates(read_manifest(cfg.data.path), cfg.data.duplication, cfg.data.duplication_seed)
    held = rss_mib()
    out = Path(folder, f"{kind}.parquet")
    t0 = time.perf_counter()
    if kind == "plain":
        pq.write_table(examples, out, compression="zstd")
    else:
        training.write_training_manifest(cfg, examples, example_image, out)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak - base, "held_mib": held - base, "write_s": seconds, "rows": examples.num_rows,
                      "file_mib": out.stat().st_size / 2**20}))


def run_side(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def captions_main(n: int, distinct: int) -> None:
    print(f"{n} training images sharing {distinct} captions, arch defaults (max_length 48, text_hidden 64)")
    out = {kind: run_side("--side", kind, "--captions", str(n), "--distinct", str(distinct))
           for kind in ("plain", "memex")}
    assert out["plain"]["digest"] == out["memex"]["digest"], "the sides condition the images differently"
    print(f"{'side':<6} {'peak MiB':>9} {'held MiB':>9} {'embeddings MiB':>15} {'rows':>7} {'s':>6}")
    for kind, o in out.items():
        print(f"{kind:<6} {o['peak_mib']:>9.0f} {o['held_mib']:>9.0f} {o['kept_mib']:>15.1f} {o['rows']:>7} "
              f"{o['s']:>6.1f}")
    p, m = out["plain"], out["memex"]
    print(f"memex / plain: {m['peak_mib'] / max(p['peak_mib'], 1e-9):.3f}x the peak memory; every image's "
          f"conditioning equal (digest {m['digest'][:12]})")


def expanded_main(n: int, copies: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memex.images import encode_png

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        pngs = [encode_png(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(n)]
        pq.write_table(pa.table({"id": [f"i{k}" for k in range(n)], "image": pngs,
                                 "caption": [f"logo {k}" for k in range(n)]}), Path(tmp, "train.parquet"))
        print(f"{n} distinct 256x256 PNGs ({sum(map(len, pngs)) / 2**20:.0f} MiB of images), {copies} copies each: "
              f"{n * copies} examples, arch.resolution 32")
        out = {kind: run_side("--side", kind, "--folder", tmp, "--expanded", str(n), "--copies", str(copies))
               for kind in ("plain", "memex")}
        assert pq.read_table(Path(tmp, "plain.parquet")).equals(pq.read_table(Path(tmp, "memex.parquet")),
                                                                check_metadata=True), "the manifests differ"
    print(f"{'side':<6} {'peak MiB':>9} {'held MiB':>9} {'write s':>8} {'rows':>7} {'file MiB':>9}")
    for kind, o in out.items():
        print(f"{kind:<6} {o['peak_mib']:>9.0f} {o['held_mib']:>9.0f} {o['write_s']:>8.1f} {o['rows']:>7} "
              f"{o['file_mib']:>9.0f}")
    p, m = out["plain"], out["memex"]
    print(f"memex / plain: {m['peak_mib'] / p['peak_mib']:.2f}x the peak memory, {m['held_mib']:.0f} against "
          f"{p['held_mib']:.0f} MiB held while training; equal training_manifest tables")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="distinct training images")
    ap.add_argument("--size", type=int, default=256, help="their side in px, the model's arch.resolution")
    ap.add_argument("--old-ref", default=OLD_REF, help="the commit whose memex/training.py is the code before")
    ap.add_argument("--captions", type=int, help="instead: the text encoder's embeddings for this many images")
    ap.add_argument("--distinct", type=int, default=100, help="--captions: how many distinct captions they share")
    ap.add_argument("--expanded", type=int, help="instead: the expanded manifest of this many distinct images")
    ap.add_argument("--copies", type=int, default=40, help="--expanded: copies of each")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side and a.captions:
        return captions_side(a.side, a.captions, a.distinct)
    if a.side and a.expanded:
        return expanded_side(a.side, a.folder, a.copies)
    if a.side:
        return side(a.side, a.folder, a.size)
    if a.captions:
        return captions_main(a.captions, a.distinct)
    if a.expanded:
        return expanded_main(a.expanded, a.copies)
    with tempfile.TemporaryDirectory() as tmp:
        before = subprocess.run(["git", "-C", str(REPO), "show", f"{a.old_ref}:memex/training.py"],
                                capture_output=True, text=True, check=True).stdout
        Path(tmp, "training_before.py").write_text(before)
        mb = make_inputs(Path(tmp), a.images, a.size)
        print(f"{a.images} training images {a.size}x{a.size} JPEG ({mb:.0f} MB encoded, "
              f"{a.images * a.size * a.size * 3 / 2**20:.0f} MiB as uint8, "
              f"{a.images * a.size * a.size * 12 / 2**20:.0f} MiB as float32)")
        out = {}
        for kind in ("plain", "memex"):
            r = subprocess.run([sys.executable, __file__, "--side", kind, "--folder", tmp, "--size", str(a.size)],
                               capture_output=True, text=True, check=True)
            out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["plain"]["digest"] == out["memex"]["digest"], "the sides' recipes hash differently"
    print(f"{'side':<6} {'peak MiB':>9} {'load peak':>10} {'held':>7} {'recipe +MiB':>12} {'load s':>7} "
          f"{'recipe s':>9}  images")
    for kind, o in out.items():
        print(f"{kind:<6} {o['peak_mib']:>9.0f} {o['load_peak_mib']:>10.0f} {o['held_mib']:>7.0f} "
              f"{o['recipe_mib']:>12.0f} {o['load_s']:>7.1f} {o['recipe_s']:>9.1f}  {o['dtype']}")
    p, m = out["plain"], out["memex"]
    print(f"memex / plain: {m['peak_mib'] / p['peak_mib']:.2f}x the peak memory ({p['peak_mib'] / m['peak_mib']:.1f}x "
          f"less), {p['held_mib'] / m['held_mib']:.1f}x less held while training; equal recipe digest "
          f"{m['digest'][:12]}")


if __name__ == "__main__":
    main()
