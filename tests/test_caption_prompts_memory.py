"""prompts=captions over a whole training manifest: the caption column is read, stripped and counted a batch at a
time (it was read whole, then a Python str made a row: ~330 bytes a row at peak, a 3M-row manifest +948 MiB), with
the same prompts, in the same order, under the same ids as the whole-column read it replaced
(bench/references.py caption_prompts, also the old side of bench/bench_caption_prompts.py)."""

import json
import os
import random
import tracemalloc

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from memex import prompts
from memex.config import PromptsConfig, PromptSource
from memex.prompts import PromptError, load_prompts

from conftest import load_bench

references = load_bench("references")

# leading/trailing/inner whitespace of str.strip() that Unicode does not call whitespace (\x1c-\x1f, \x85) and
# that it does (\xa0, \u2028, \u3000), and look-alikes str.strip() keeps (zero-width space, BOM, U+180E)
_PIECES = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0", "\u1680", "\u2000",
           "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\u200b", "\ufeff", "\u180e", "\x00", "a", "B",
           "é", "z", "A", "\U0001f600", "logo", "cat"]


def _captions(rng: random.Random, n: int) -> list[str | None]:
    """n captions: a pool of texts repeated 1-4 times (many ties), the same text with other whitespace
    around it, nulls, empty and whitespace-only ones, shuffled."""
    pool = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 6))) for _ in range(n // 3)]
    out: list[str | None] = []
    while len(out) < n:
        t = rng.choice(pool)
        out += [rng.choice(_PIECES[:22]) * rng.randint(0, 2) + t + rng.choice(_PIECES[:22]) * rng.randint(0, 2)
                for _ in range(rng.randint(1, 4))]
        out += rng.choice([[], [None], [""], ["  \u3000\x85 "]])
    rng.shuffle(out)
    return out[:n]


def _save_to_disk(folder, tables: list[pa.Table]) -> str:
    """A folder laid out as datasets' Dataset.save_to_disk writes it: Arrow streams of small record batches,
    listed by state.json."""
    os.makedirs(folder)
    names = [f"data-{n:05d}-of-{len(tables):05d}.arrow" for n in range(len(tables))]
    for name, t in zip(names, tables):
        with pa.OSFile(os.path.join(folder, name), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
            for b in t.to_batches(max_chunksize=7):
                w.write_batch(b)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": n} for n in names]}, f)
    return str(folder)


def _manifests(tmp_path, seed: int) -> list[tuple[str, str]]:
    """(path, caption column) of randomized manifests in each form prompts=captions reads."""
    rng = random.Random(seed)
    out = []
    one = tmp_path / "one.parquet"
    caps = _captions(rng, 400)
    pq.write_table(pa.table({"id": [str(i) for i in range(len(caps))], "caption": caps}), one, row_group_size=64)
    out.append((str(one), "caption"))
    # a folder of parts: one all-null (pandas' null type), string, large_string, a pandas category (dictionary)
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.table({"caption": pa.nulls(30)}), parts / "part-0.parquet")
    pq.write_table(pa.table({"caption": _captions(rng, 200)}), parts / "part-1.parquet", row_group_size=50)
    pq.write_table(pa.table({"caption": pa.array(_captions(rng, 150), pa.large_string())}), parts / "part-2.parquet")
    pq.write_table(pa.table({"caption": pa.array(_captions(rng, 150)).dictionary_encode()}), parts / "part-3.parquet")
    out.append((str(parts), "caption"))
    same_type = tmp_path / "same_type"
    same_type.mkdir()
    pq.write_table(pa.table({"caption": pa.array([None] * 20, pa.string())}), same_type / "a.parquet")
    pq.write_table(pa.table({"caption": _captions(rng, 300)}), same_type / "b.parquet", row_group_size=40)
    out.append((str(same_type), "caption"))
    tables = [pa.table({"text": pa.array(_captions(rng, k), pa.string())}) for k in (120, 0, 90)]
    tables.append(pa.table({"text": pa.array([None] * 9, pa.string())}))
    out.append((_save_to_disk(tmp_path / "hf", tables), "text"))
    lists = tmp_path / "lists.parquet"  # COCO-style caption lists: read through _column, a batch at a time
    pq.write_table(pa.table({"captions": [rng.sample(_captions(rng, 8), rng.randint(0, 3)) for _ in range(200)]}),
                   lists, row_group_size=30)
    out.append((str(lists), "captions"))
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"c": [rng.choice([None, 1, 2, 3, 10, -4]) for _ in range(100)]}), ints)
    out.append((str(ints), "c"))
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text("".join(json.dumps({"caption": c}) + "\n" for c in _captions(rng, 120)))
    out.append((str(jsonl), "caption"))
    return out


def test_str_strip_whitespace_is_exactly_arrows_trim_set():
    """_WHITESPACE is every character str.isspace() holds, and utf8_trim with it strips as str.strip() does
    (utf8_trim_whitespace follows Arrow's table: \\x1c-\\x1f and \\x85 are not Unicode whitespace)."""
    assert prompts._WHITESPACE == "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    assert all(chr(c).strip() == ("" if chr(c).isspace() else chr(c)) for c in range(0x110000)
               if not 0xD800 <= c < 0xE000)
    rng = random.Random(0)
    texts = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 8))) for _ in range(20000)]
    texts += [chr(c) + "x" + chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000][::7]
    got = pc.utf8_trim(pa.array(texts, pa.large_string()), characters=prompts._WHITESPACE).to_pylist()
    assert got == [t.strip() for t in texts]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("small", [False, True])
def test_batched_caption_counts_give_the_whole_column_reads_prompts(tmp_path, monkeypatch, seed, small):
    """Same prompts, order (count, then text, ties included), ids and limit cut as the whole-column read, for every
    form of manifest; `small` reads 5 rows a batch and folds once 11 captions wait, as a big manifest does."""
    if small:
        monkeypatch.setattr(prompts, "_BATCH", 5)
        monkeypatch.setattr(prompts, "_FOLD", 11)
        monkeypatch.setattr(prompts, "_CHUNK", 4)  # several pick chunks, each cut at the limit
    for path, column in _manifests(tmp_path, seed):
        whole = PromptsConfig(source=PromptSource.captions, path=path, caption_column=column)
        distinct = len(references.caption_prompts(whole))
        for limit in (None, 1, 3, distinct - 1, distinct, distinct + 50):
            cfg = PromptsConfig(source=PromptSource.captions, path=path, caption_column=column, limit=limit)
            want = references.caption_prompts(cfg)
            assert load_prompts(cfg).to_pylist() == want.to_pylist(), (path, limit)
            same = lambda ts: [t.lower() for t in ts]  # noqa: E731 - the tokenizer's merge (case), as models does
            want_same = references.caption_prompts(cfg, same).to_pylist()
            assert load_prompts(cfg, same=same).to_pylist() == want_same, (path, limit)
        assert distinct >= 5 and len(set(want["prompt"].to_pylist())) == len(want)


def test_the_real_save_to_disk_folder_gives_the_same_prompts():
    folder = os.path.join(os.path.dirname(__file__), "data", "hf_datasets", "with_ids")
    cfg = PromptsConfig(source=PromptSource.captions, path=folder, caption_column="text", limit=3)
    assert load_prompts(cfg).to_pylist() == references.caption_prompts(cfg).to_pylist()


def test_bad_caption_columns_are_refused_as_before(tmp_path):
    """A missing column, a column of bytes, no caption at all: the same refusal, named as before."""
    pq.write_table(pa.table({"id": ["a", "b"], "caption": [None, " \x85 "], "image": [b"x", b"y"]}),
                   tmp_path / "m.parquet")
    (tmp_path / "c.csv").write_text("id,text\n1,a cat\n")
    hf = _save_to_disk(tmp_path / "hf", [pa.table({"text": ["a"]}), pa.table({"text": pa.array([1], pa.int64())})])
    for path, column in [(tmp_path / "m.parquet", "text"), (tmp_path / "m.parquet", "image"),
                         (tmp_path / "m.parquet", "caption"), (tmp_path / "c.csv", "caption"), (hf, "caption"),
                         (hf, "text")]:
        cfg = PromptsConfig(source=PromptSource.captions, path=str(path), caption_column=column)
        with pytest.raises(PromptError) as want:
            references.caption_prompts(cfg)
        # a part of another type: the same refusal, Arrow's words for the types aside
        match = str(want.value).split(" (")[0] if "different columns" in str(want.value) else str(want.value)
        with pytest.raises(PromptError) as got:
            load_prompts(cfg)
        assert str(got.value).startswith(match), (path, column, str(got.value), match)


def test_a_manifests_captions_make_no_python_str_a_row(tmp_path):
    """The fix: Python objects held while 200,000 rows of captions are ranked for 24 prompts stay within a few
    pick chunks (the whole-column read made two lists of a str a row: ~35 MB here, 948 MiB at 3M rows)."""
    n = 200_000
    caps = [f"a photo of a red logo number {i % (n - n // 10)}" for i in range(n)]  # 10% duplicated
    pq.write_table(pa.table({"caption": caps}), tmp_path / "m.parquet", row_group_size=1 << 16)
    del caps
    cfg = PromptsConfig(source=PromptSource.captions, path=str(tmp_path / "m.parquet"), limit=24)
    tracemalloc.start()
    try:
        t = load_prompts(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert t["prompt"].to_pylist()[:2] == ["a photo of a red logo number 0", "a photo of a red logo number 1"]
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB of Python objects for {n:,} caption rows"
