"""triage=preview's worker (memex/stages/triage.py TriagePrompts) holds a chunk's preview PNGs once: each step's
PNGs go into Arrow as they are encoded, and the column is those arrays. The code before kept every PNG of the
chunk as Python bytes until pa.table copied them, so at its return the chunk's PNGs were in memory twice (a
default chunk, 256 prompts x 8 previews at 512 px, is 0.9-1.3 GB of PNGs; its peak RSS was 3.0x the PNGs:
bench/bench_preview_memory.py). The table, and the Parquet file written from it, are the same as before."""

from __future__ import annotations

import io
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import memex.images
import memex.stages.triage as triage
from memex import config as c
from memex.layout import PREVIEWS_SCHEMA
from memex.plan import tie_shard_size

PROMPTS, SEEDS, BATCH = 8, 4, 4  # 32 previews in 8 steps of one batch (shard_size = batch_size)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from memex import tiny
    from memex.stages import generate

    root = tmp_path_factory.mktemp("preview-memory")
    model = tiny.build_sd15(root / "sd15", image_size=64)  # SD 1.x's layout at 64 px: 8x8 latents
    (root / "prompts.txt").write_text("\n".join(f"prompt {i}" for i in range(PROMPTS)))
    cfg = c.AuditConfig(model=c.ModelConfig(path=str(model), name="t"),
                        sampling=c.SamplingConfig(samples_per_prompt=SEEDS, batch_size=BATCH, shard_size=BATCH,
                                                  guidance_scale=7.5),
                        prompts=c.PromptsConfig(source=c.PromptSource.file, path=str(root / "prompts.txt")),
                        storage=c.StorageConfig(root=str(root / "runs")),
                        resources=c.ResourcesConfig(executor=c.ExecutorKind.local, device="cpu"),
                        triage=c.TriageConfig(kind=c.TriageKind.preview, seeds=SEEDS, steps=2,
                                              prompts_per_task=PROMPTS))
    return triage.TriagePrompts(cfg, generate.prepare(cfg))


def previews_before(w: triage.TriagePrompts, p0: int, p1: int) -> pa.Table:
    """The preview branch of TriagePrompts.__call__ before: every PNG of the chunk in one Python list, copied
    into Arrow by pa.table at the end."""
    from memex.sampling import sample_seed

    t, s = w.cfg.triage, w.cfg.sampling
    ids, texts = w.prompt_ids[p0:p1], w.prompts[p0:p1]
    rows_ids = [pid for pid in ids for _ in range(t.seeds)]
    rows_texts = [p for p in texts for _ in range(t.seeds)]
    index_of = [j % t.seeds for j in range(len(rows_ids))]
    seeds = [sample_seed(s.seed, pid, i) for pid, i in zip(rows_ids, index_of)]
    step, png = tie_shard_size(s.shard_size, s.batch_size), []
    for j in range(0, len(rows_ids), step):
        images = w.sampler.generate(rows_ids[j:j + step], rows_texts[j:j + step], seeds[j:j + step])
        png += [memex.images.encode_png(x, s.png_compress_level) for x in images]
    return pa.table({"prompt_id": rows_ids, "prompt": rows_texts, "sample_index": index_of, "image": png},
                    schema=PREVIEWS_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")  # as Store.write_table writes a unit
    return buf.getvalue()


def test_previews_are_the_same_rows_and_bytes_as_before(worker):
    table, cost = worker(0, 0, PROMPTS)
    before = previews_before(worker, 0, PROMPTS)
    assert table.num_rows == PROMPTS * SEEDS and table.schema == PREVIEWS_SCHEMA
    assert table.equals(before)  # every row, every PNG byte
    assert parquet_bytes(table) == parquet_bytes(before)  # and the file written from it
    assert cost["unet_evaluations"] > 0
    # a chunk shorter than a step (one prompt: 4 rows), and one ending in a part step
    for p0, p1 in ((3, 4), (1, 4)):
        assert worker(0, p0, p1)[0].equals(previews_before(worker, p0, p1))


class Counted(bytes):
    """A PNG's bytes whose size counts in `live` until Python frees them (bytes take no weak references)."""

    live = 0

    def __del__(self):
        Counted.live -= len(self)


def test_chunk_pngs_are_never_held_twice(worker, monkeypatch):
    """The most a chunk's PNGs take at once, as Python bytes (still referenced) plus Arrow memory (pyarrow's
    pool), sampled after each encode and each pyarrow call of the worker: one copy of the chunk and one step's
    bytes. The code before held every PNG as bytes while pa.table copied them: twice the chunk."""
    encode, real_pa = memex.images.encode_png, triage.pa
    top, base = [0], pa.total_allocated_bytes()

    def sample():
        top[0] = max(top[0], Counted.live + pa.total_allocated_bytes() - base)

    def counted_png(*a, **k):
        out = Counted(encode(*a, **k))
        Counted.live += len(out)
        sample()
        return out

    def spied(fn):
        def call(*a, **k):
            out = fn(*a, **k)
            sample()  # its arguments still referenced: a list of bytes it copied is live
            return out
        return call

    proxy = types.SimpleNamespace(**{n: getattr(real_pa, n) for n in dir(real_pa) if not n.startswith("__")})
    for name in ("array", "chunked_array", "table", "Table", "concat_arrays", "concat_tables"):
        setattr(proxy, name, spied(getattr(real_pa, name)))
    monkeypatch.setattr(memex.images, "encode_png", counted_png)
    monkeypatch.setattr(triage, "pa", proxy)
    table, _ = worker(0, 0, PROMPTS)
    held = top[0]
    sizes = [len(b) for b in table["image"].to_pylist()]
    del table
    rows = tie_shard_size(worker.cfg.sampling.shard_size, worker.cfg.sampling.batch_size)  # a step's previews
    chunk, step = sum(sizes), max(sum(sizes[j:j + rows]) for j in range(0, len(sizes), rows))
    assert len(sizes) == PROMPTS * SEEDS and len(sizes) // rows == 8
    # 32 noise-like 64 px PNGs of ~11 kB in 8 steps: one copy and a step is ~1.13x the chunk, two copies 2x.
    # (1/16 of the chunk of slack: Arrow's offsets and 64-byte buffer padding.)
    assert held <= chunk + step + chunk / 16, (
        f"the worker held {held / chunk:.2f}x its chunk's PNGs at once ({held} bytes; chunk {chunk}, one step "
        f"{step}): the chunk's PNGs as Python bytes and as Arrow together")
