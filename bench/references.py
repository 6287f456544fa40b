"""The code before a memory change, kept once: the bench that measures the change side by side runs it as the
"before" side, and the test that checks the new code gives the same answer compares with it. A copy in each
drifted apart (the test's took `same` and limit=None, the bench's did not); here both read one.

Each function is the replaced code as it was, on today's helpers (memex.prompts' _Distinct, _CHUNK,
rank_captions), so the comparison is of the reading strategy alone."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from memex import prompts
from memex.config import PromptsConfig
from memex.layout import PROMPTS_SCHEMA
from memex.prompts import PromptError, prompt_id, rank_captions


def _table(rows: list[tuple[str, str]], limit: int | None, why: str) -> pa.Table:
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise PromptError(why)
    return pa.table({"prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows]}, schema=PROMPTS_SCHEMA)


def caption_prompts(cfg: PromptsConfig, same=None) -> pa.Table:
    """load_prompts' prompts=captions before the batched read (memex/prompts.py before 2026-12-08): the whole
    caption column as Python strs (a 3,000,000-row manifest: 1,846 MiB of RSS growth), stripped, ranked by
    rank_captions, picked _CHUNK at a time. bench/bench_caption_prompts.py, tests/test_caption_prompts_memory.py."""
    key = "prompts.caption_column"
    table = prompts._open_table(cfg.path, {}, {cfg.caption_column: key})
    col = prompts._column(table, cfg.caption_column, cfg.path, key)
    ranked = rank_captions(pa.array([c.strip() if c is not None else None for c in col]))
    texts = [t for t in ranked["caption"].to_pylist() if t]
    ids = [prompt_id(t) for t in texts]
    picked = prompts._Distinct(same)
    for start in range(0, len(texts), prompts._CHUNK):
        picked.add(texts[start:start + prompts._CHUNK], ids[start:start + prompts._CHUNK])
        if cfg.limit is not None and len(picked.rows) >= cfg.limit:
            break
    return _table(picked.rows, cfg.limit, f"prompts.path={cfg.path} holds no prompts (after dropping empty lines)")


def rank_near_duplicates(dups: pa.Table, limit: int | None, same=None) -> pa.Table:
    """rank_by_near_duplicates before the pages (memex/prompts.py before 2026-12-08), on read_duplicates'
    whole table as the audit called it (every training row's caption and count at once: 630 MiB of RSS
    growth for 2,000,000 rows). bench/bench_dups_memory.py, tests/test_membership_memory.py."""
    t = dups.filter(pc.invert(pc.is_null(dups["caption"])))
    t = t.sort_by([("near_duplicates", "descending"), ("caption", "ascending")])
    picked = prompts._Distinct(same)
    captions = t["caption"]
    for start in range(0, len(captions), prompts._CHUNK):
        picked.add(c.strip() for c in captions.slice(start, prompts._CHUNK).to_pylist())
        if limit is not None and len(picked.rows) >= limit:
            break
    return _table(picked.rows, limit, "no captions")


def read_gids(layout, gids: list[int], columns: list[str] | None = None) -> pa.Table:
    """train_rows.read_gids before read_in (memex/train_rows.py before 2026-12-08): one read_table with a
    ("gid", "in", gids) filter, which pyarrow 26 prunes row groups by only for a few values (640 gids read
    all 3,907 groups of a 1M-row train_rows.parquet). bench/bench_gid_reads.py."""
    from memex.layout import TRAIN_SCHEMA
    from memex.train_rows import _with_images, table_path

    columns = columns or TRAIN_SCHEMA.names
    if not gids:
        return TRAIN_SCHEMA.empty_table().select(columns)
    path, packed = table_path(layout)
    packed = packed and "image" in columns
    read = [c for c in columns if not (packed and c == "image")] + (["image_offset", "image_length"] if packed else [])
    t = layout.store.read_table(path, columns=read, filters=[("gid", "in", sorted(set(gids)))])
    return _with_images(layout, t).select(columns) if "image" in columns else t.select(columns)


def read_pictures_table(layout, gids: list[int]) -> pa.Table:
    """membership._pictures before read_in, as read_pictures called it: pictures.parquet read with a
    ("gid", "in", gids) filter, every column. bench/bench_gid_reads.py."""
    from memex.layout import PICTURES_SCHEMA

    return layout.store.read_table(layout.pictures_path, schema=PICTURES_SCHEMA, filters=[("gid", "in", gids)])


def parquet_batches(path: str, fs, f: str, batch_rows: int):
    """memex.manifest._parquet_batches before buffer_size: a Parquet part of one row group (pq.write_table's
    default) had its image column read whole at once."""
    import pyarrow.parquet as pq

    from memex.manifest import ManifestError

    try:
        yield from pq.ParquetFile(f, filesystem=fs, pre_buffer=False).iter_batches(batch_size=batch_rows)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ManifestError(f"training manifest {path}: {f} is not readable Parquet: {type(e).__name__}: {e}") from e


_TAR_INDEX: dict = {}


def tar_offsets_64(tar_uri: str, opts: dict, version: str | None, listings: str | None) -> tuple[dict, bool]:
    """shards._offsets before the byte bound (memex/shards.py before 2026-12-08), less its per-shard lock: each
    shard's offsets a dict of str -> (int, int) (~195 bytes a member), the last 64 shards kept. A samples shard's
    640 neighbours in 400 tar shards looked ~540 of them up again. bench/bench_gid_reads.py --tars."""
    from collections import OrderedDict

    from memex import shards

    index = _TAR_INDEX.setdefault("index", OrderedDict())
    key = (tar_uri, version, listings is not None)
    if key in index:
        index.move_to_end(key)
        return index[key]
    members = shards.kept_offsets(tar_uri, opts, listings) if listings else None
    got = (members, True) if members is not None else (shards._scan(tar_uri, opts), False)
    got = ({m: (o, n) for m, o, n in zip(*(a.to_pylist() for a in (got[0].members, got[0].offsets,
                                                                    got[0].sizes)))}, got[1])
    index[key] = got
    while len(index) > 64:
        index.popitem(last=False)
    return got


def report_png_whole(pixels, gid: int) -> bytes:
    """keep_for_report's PNG of a training image before the bound (memex/stages/match.py before 2026-12-08): its
    whole pixels (a 24 MP photo: a 46 MB PNG in 2.8 s). bench/bench_gid_reads.py --report."""
    from memex.images import encode_png

    return encode_png(pixels[gid])
