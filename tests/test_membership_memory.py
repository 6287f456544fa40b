"""The audit's prompt ranking reads the index's near-duplicate counts a page at a time
(memex.membership.NearDuplicates): it held every training row (gid, id, caption) in the driver and sorted
them twice to pick prompts.limit captions, +520 MiB for 2M rows (~500 GiB at LAION-2B's). The prompts,
their order and their ties must stay those of the whole-table ranking: a run folder is named by them."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

import memex.membership as membership
import memex.prompts as prompts
from memex.layout import DUPS_SCHEMA, IndexLayout, StorageError
from memex.membership import IndexInfo, NearDuplicates, read_duplicates
from memex.prompts import PromptError, rank_by_near_duplicates

from conftest import load_bench

# the whole-table ranking before the pages (also the old side of bench/bench_dups_memory.py)
references = load_bench("references")


def lowered(texts: list[str]) -> list[str]:
    """A tokenizer's keys as CLIP's behave: case and spacing merged, a cut past 12 characters."""
    return [re.sub(r"\s+", " ", t.lower())[:12] for t in texts]


def write_dups(tmp_path, shards: list[pa.Table], row_group: int | None = None) -> IndexInfo:
    layout = IndexLayout(str(tmp_path), "k")
    layout.dups.row_group_size = row_group
    start = 0
    for s, t in enumerate(shards):
        gids = pa.array(np.arange(start, start + t.num_rows), pa.int64())
        layout.dups.write_shard(s, pa.table({"gid": gids, "id": [f"r{g}" for g in gids.to_pylist()],
                                             "caption": t["caption"], "near_duplicates": t["near_duplicates"]},
                                            schema=DUPS_SCHEMA))
        start += t.num_rows
    n = start
    return IndexInfo(root=str(tmp_path), key="k", shards=[(0, n)], metric="l2", dim=8, n_train=n, n_indexed=n,
                     n_quarantined=0)


WORDS = ["a cat", "A Cat", "a  cat", " a cat", "a cat ", "zebra", " zebra", "apple", "Apple pie",
         "apple pie on a plate", "apple pie on a table", "", "   ", None,
         "a dog", "a dog\u00e9", "\u00e9clair", "Zebra", "b", "a"]


def random_dups(rng, rows: int) -> pa.Table:
    """Many ties: a few counts, captions drawn from a small set (shared, merged by `lowered`, blank, null)
    and unique ones."""
    pool = WORDS + [f"caption {i}" for i in range(rng.integers(1, 40))]
    caps = [pool[i] if rng.random() < 0.7 else f"unique {rng.integers(0, 10**6)}"
            for i in rng.integers(0, len(pool), rows)]
    levels = rng.choice([0, 0, 0, 1, 2, 3, 7, 50, 51, 1000], rows)
    return pa.table({"caption": pa.array(caps, pa.string()), "near_duplicates": pa.array(levels, pa.int32())})


@pytest.mark.parametrize("seed", range(12))
def test_pages_rank_the_prompts_of_the_whole_table(tmp_path, monkeypatch, seed):
    """Random dups folders of 1-4 shards (one may be empty), small row groups and batches and a chunk of 3
    (so a ranking spans several pages, each file compacts and skips row groups by their counts): every
    limit, with and without a tokenizer's merging, gives the prompts, order and ties of the old ranking."""
    monkeypatch.setattr(prompts, "_CHUNK", 3)
    monkeypatch.setattr(membership, "_SCAN_BATCH", 7)
    rng = np.random.default_rng(seed)
    shards = [random_dups(rng, int(rng.integers(0, 300))) for _ in range(rng.integers(1, 5))]
    info = write_dups(tmp_path, shards, row_group=int(rng.choice([5, 16, 1000])))
    whole = read_duplicates(info, {})
    for limit in (1, 2, 3, 5, 11, 40, 97, 10_000, None):
        for same in (None, lowered):
            try:
                want = references.rank_near_duplicates(whole, limit, same).to_pylist()
            except PromptError:
                with pytest.raises(PromptError, match="no captions to use as prompts"):
                    rank_by_near_duplicates(NearDuplicates(info, {}), limit, same)
                continue
            got = rank_by_near_duplicates(NearDuplicates(info, {}), limit, same)
            assert got.to_pylist() == want, (limit, same)


def test_a_page_holds_its_own_rows_not_the_training_set(tmp_path, monkeypatch):
    """60,000 training rows, prompts.limit=5: one page of 8,192 rows is read, and no file holds more than
    twice that plus a batch at once (the whole table was read and sorted: every row)."""
    monkeypatch.setattr(membership, "_SCAN_BATCH", 1000)
    rng = np.random.default_rng(0)
    shards = [pa.table({"caption": [f"caption {i % 5000}" for i in range(s, s + 30_000)],
                        "near_duplicates": pa.array(rng.integers(0, 30, 30_000), pa.int32())})
              for s in (0, 30_000)]
    info = write_dups(tmp_path, shards, row_group=4096)
    held, first = [], membership._first
    monkeypatch.setattr(membership, "_first", lambda t, size: held.append(t.num_rows) or first(t, size))
    pages = []
    dups = NearDuplicates(info, {})
    real_pages = dups.pages
    dups.pages = lambda n: (pages.append(p.num_rows) or p for p in real_pages(n))
    got = rank_by_near_duplicates(dups, 5)
    assert got.to_pylist() == references.rank_near_duplicates(read_duplicates(info, {}), 5).to_pylist()
    assert pages == [8192]
    assert max(held) <= 2 * 8192 + 1000


def test_a_damaged_dups_file_is_named_with_its_recovery(tmp_path):
    info = write_dups(tmp_path, [random_dups(np.random.default_rng(1), 50)] * 2)
    layout = info.layout({})
    with open(layout.dups.file(1), "wb") as f:
        f.write(b"not parquet")
    with pytest.raises(StorageError, match=r"shard-000001\.parquet is not readable Parquet.*"
                                           r"_markers/shard-000001\.json"):
        rank_by_near_duplicates(NearDuplicates(info, {}), 3)
