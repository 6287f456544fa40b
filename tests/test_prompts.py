import json
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex.config import PromptsConfig, PromptSource
from memex.prompts import UNCONDITIONAL_ID, PromptError, load_prompts, prompt_id, rank_captions

PINNED_ID = "51e4674156077982"  # prompt_id("a cat") since the first run folders


def test_prompt_id_is_stable_and_text_dependent():
    # pinned: prompt ids name samples, rounds and matches in run folders; another id scheme would orphan
    # every existing run folder's resume
    assert prompt_id("a cat") == PINNED_ID
    assert prompt_id("a cat") != prompt_id("a cat ")
    assert len(prompt_id("x")) == 16


def test_txt_drops_blank_lines_and_duplicates(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat\n\n  a dog  \na cat\n")
    t = load_prompts(PromptsConfig(source=PromptSource.file, path=str(p)))
    assert t["prompt"].to_pylist() == ["a cat", "a dog"]
    assert t["prompt_id"].to_pylist() == [prompt_id("a cat"), prompt_id("a dog")]


def test_a_file_saved_by_a_windows_editor_reads_as_the_same_prompts(tmp_path):
    """A UTF-8 byte-order mark and CRLF line ends: the mark stayed in the first prompt (a
    different prompt id, and 3 extra CLIP tokens conditioning its samples) and failed a .jsonl's
    first line as invalid JSON."""
    plain, windows = tmp_path / "plain.txt", tmp_path / "windows.txt"
    plain.write_text("a red logo\na blue logo\n")
    windows.write_bytes(b"\xef\xbb\xbfa red logo\r\na blue logo\r\n")
    read = [load_prompts(PromptsConfig(source=PromptSource.file, path=str(p))).to_pylist() for p in (plain, windows)]
    assert read[1] == read[0] and read[1][0]["prompt"] == "a red logo"
    jsonl = tmp_path / "windows.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"prompt": "a red logo"}\r\n{"prompt": "a blue logo"}\r\n')
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=str(jsonl))).to_pylist() == read[0]


def test_jsonl_with_id_column_and_limit(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"id": f"x{i}", "text": f"prompt {i}"}) for i in range(5)))
    t = load_prompts(PromptsConfig(source=PromptSource.file, path=str(p), column="text", id_column="id", limit=3))
    assert t["prompt_id"].to_pylist() == ["x0", "x1", "x2"]


def test_csv_prompts_and_list_cells(tmp_path):
    """A .csv with a header row (was "unsupported extension"); a cell holding several captions
    (COCO-style lists) gives its first, where str() made "['a', 'b']" a prompt and the caption
    source dropped the row; a column that is not text is named."""
    p = tmp_path / "p.csv"
    p.write_text('id,text\nx1,"a red logo, round"\nx2,a blue logo\n')
    t = load_prompts(PromptsConfig(source=PromptSource.file, path=str(p), column="text", id_column="id"))
    assert t.to_pylist() == [{"prompt_id": "x1", "prompt": "a red logo, round"},
                             {"prompt_id": "x2", "prompt": "a blue logo"}]
    lists = tmp_path / "coco.parquet"
    pq.write_table(pa.table({"captions": [["a red logo", "a logo"], ["", "a blue logo"], []],
                             "meta": [{"w": 1}] * 3}), lists)
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=str(lists), column="captions")
                        )["prompt"].to_pylist() == ["a red logo", "a blue logo"]
    assert sorted(load_prompts(PromptsConfig(source=PromptSource.captions, path=str(lists), caption_column="captions")
                               )["prompt"].to_pylist()) == ["a blue logo", "a red logo"]
    with pytest.raises(PromptError, match=r"column 'meta' holds struct<w: int64>, not text; set prompts.column="):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(lists), column="meta"))


def test_parquet_prompts(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["one", "two"]}), p)
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=str(p)))["prompt"].to_pylist() == ["one", "two"]


def test_captions_of_a_manifest_folder_with_images_and_stats_beside_its_parts(tmp_path):
    """prompts=captions on a Parquet manifest folder that the training set's reader takes (its relative uris'
    images beside the parts, img2dataset's _stats.json, a Spark _temporary/ attempt) read every file as
    Parquet: "Could not read schema from imgs/0.png". It reads the folder's Parquet parts, as the reader does."""
    from memex.images import encode_png

    m = tmp_path / "manifest"
    (m / "imgs").mkdir(parents=True)
    (m / "imgs" / "0.png").write_bytes(encode_png(np.zeros((4, 4, 3), np.uint8)))
    (m / "00000_stats.json").write_text("{}")
    (m / "_temporary").mkdir()
    pq.write_table(pa.table({"id": ["x"], "caption": ["stray attempt"]}), m / "_temporary" / "part-9.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "uri": ["imgs/0.png"] * 2, "caption": ["a logo", "a cat"]}),
                   m / "part-0.parquet")
    pq.write_table(pa.table({"id": ["c"], "uri": ["imgs/0.png"], "caption": ["a logo"]}), m / "part-1.parquet")
    t = load_prompts(PromptsConfig(source=PromptSource.captions, path=str(m)))
    assert t["prompt"].to_pylist() == ["a logo", "a cat"]
    (m / "part-0.parquet").unlink()
    (m / "part-1.parquet").unlink()
    with pytest.raises(PromptError, match=r"is a folder without a .parquet file: give a prompt file"):
        load_prompts(PromptsConfig(source=PromptSource.captions, path=str(m)))


def test_jsonl_prompts_with_keys_varying_by_line_cut_emojis_and_mixed_id_types(tmp_path):
    """Three .jsonl files that escaped as raw errors or misread: the columns came from the first line only
    (an id it lacked was "no column 'id'"), a lone surrogate escape (an emoji cut in half) was a
    UnicodeEncodeError for the whole file, and ids of two types an ArrowInvalid."""
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a \\ud83d cat"}\n{"prompt": "a dog", "pid": "d"}\n{"prompt": "a \\ud83d\\ude00"}\n')
    t = load_prompts(PromptsConfig(source=PromptSource.file, path=str(p)))
    assert t["prompt"].to_pylist() == ["a \ufffd cat", "a dog", "a \U0001f600"]
    with pytest.raises(PromptError, match=r"row 0 has no id in prompts.id_column='pid'"):  # not "no column 'pid'"
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(p), id_column="pid"))
    p.write_text('{"prompt": "a", "pid": 1}\n{"prompt": "b", "pid": "x"}\n')
    with pytest.raises(PromptError, match=r"p.jsonl: key 'pid' holds values of two types .*give it one type"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(p), id_column="pid"))
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=str(p)))["prompt"].to_pylist() == ["a", "b"]
    p.write_text('{"prompt": ["a \\ud83d cat", "another"], "w": 1}\n{"prompt": ["b"], "w": "x"}\n')  # list captions
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=str(p)))["prompt"].to_pylist() == [
        "a \ufffd cat", "b"]  # its first caption; the unread key "w" of two types fails nothing
    p.write_text('["a list"]\n')
    with pytest.raises(PromptError, match=r"p.jsonl line 1 is not a JSON object"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(p)))


def test_captions_ranked_by_duplicate_count(tmp_path):
    p = tmp_path / "train.parquet"
    caps = ["rare"] + ["logo"] * 5 + ["face"] * 3 + [None, "  logo "]
    pq.write_table(pa.table({"caption": caps}), p)
    t = load_prompts(PromptsConfig(source=PromptSource.captions, path=str(p)))
    assert t["prompt"].to_pylist() == ["logo", "face", "rare"]
    ranked = rank_captions(pa.array(["b", "a", "b"]))
    assert ranked.to_pylist() == [{"caption": "b", "caption_count": 2}, {"caption": "a", "caption_count": 1}]


def test_none_source_is_one_empty_prompt():
    t = load_prompts(PromptsConfig(source=PromptSource.none))
    assert t.to_pylist() == [{"prompt_id": UNCONDITIONAL_ID, "prompt": ""}]


@pytest.mark.parametrize("content,ext,match", [
    ("\n \n", ".txt", "holds no prompts"),
    ('{"prompt": "a"}\n{oops', ".jsonl", "line 2 is not valid JSON"),
    ("x", ".xml", "unsupported extension"),
])
def test_bad_prompt_files_are_named(tmp_path, content, ext, match):
    p = tmp_path / f"p{ext}"
    p.write_text(content)
    with pytest.raises(PromptError, match=match) as e:
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(p)))
    assert str(p) in str(e.value)


def test_missing_file_and_missing_column(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(tmp_path / "nope.txt")))
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a"]}), p)
    with pytest.raises(PromptError, match="set prompts.column"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(p)))


def test_prompt_files_that_lost_prompts_silently_are_read_whole_or_refused(tmp_path):
    """Three ways a prompt file lost prompts without a word: a CSV field with an unquoted comma was cut
    at it (DictReader filed the rest under None); str.splitlines split a caption at U+0085 (NEL, caption
    mojibake) or U+2028 and broke a .jsonl line holding one; prompts.id_column made a null id "None"
    (every later null-id prompt dropped as a repeat), a float column's 3 "3.0", and dropped a second
    text under one id."""
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("id,prompt\n1,a red car, parked at night\n")
    with pytest.raises(PromptError, match=r"line 2 has more fields than its header.*quote such fields"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(csv_file)))
    txt = tmp_path / "p.txt"
    txt.write_text("café \x85 menu\nsecond\u2028line\n", encoding="utf-8")
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=str(txt)))["prompt"].to_pylist() == [
        "café \x85 menu", "second\u2028line"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=str(jsonl)))["prompt"].to_pylist() == ["a\u2028b"]
    ids = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog", "a fox"], "pid": [1.0, 3.0, None]}), ids)
    with pytest.raises(PromptError, match=r"row 2 has no id in prompts.id_column='pid'"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(ids), id_column="pid"))
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"], "pid": [1.0, 3.0]}), ids)
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=str(ids), id_column="pid")
                        )["prompt_id"].to_pylist() == ["1", "3"]
    pq.write_table(pa.table({"prompt": ["a cat", "a dog", "a cat"], "pid": ["1", "1", "2"]}), ids)
    with pytest.raises(PromptError, match=r"id '1' .* names two prompts, 'a cat' and 'a dog'"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(ids), id_column="pid"))


def test_a_manifest_as_prompts_reads_its_caption_column_only(tmp_path, monkeypatch):
    """prompts=captions with prompts.path at a training manifest (as conf/prompts/captions.yaml suggests):
    every column was read, embedded images included (5M x ~40 KB in the driver for one text column).
    Now only the named columns; a missing one is still named with all the file's columns."""
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": [b"\x89PNG" * 1000] * 3,
                             "caption": ["a cat", "a dog", "a cat"], "n": [1, 2, 3]}), path)
    read, streamed = [], []
    real, real_batches = pq.read_table, pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: read.append(k.get("columns")) or real(*a, **k))
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, **k: streamed.append(k.get("columns")) or real_batches(self, **k))
    t = load_prompts(PromptsConfig(source=PromptSource.captions, path=str(path)))  # a batch at a time since 2026-12
    assert t["prompt"].to_pylist() == ["a cat", "a dog"] and streamed == [["caption"]] and read == []
    t = load_prompts(PromptsConfig(source=PromptSource.file, path=str(path), column="caption", id_column="n"))
    assert t["prompt_id"].to_pylist() == ["1", "2"] and read[-1] == ["caption", "n"]  # "a cat" once, as id 1
    with pytest.raises(PromptError, match=r"has no column 'text' \(columns: \['id', 'image', 'caption', 'n'\]\); "
                                          r"set prompts.column=<column>"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(path), column="text"))


def test_prompt_files_name_a_missing_key_and_a_blank_id(tmp_path):
    """A .jsonl of {"text": ...} lines (datasets' metadata.jsonl) with the default prompts.column was
    "holds no prompts", not the key to set; a blank CSV id cell was the id "" (sample ids "/0")."""
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a cat"}\n{"text": "a dog", "id": "d"}\n')
    with pytest.raises(PromptError, match=r"has no column 'prompt' \(columns: \['text', 'id'\]\); set prompts.column"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(p)))
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=str(p), column="text"))["prompt"].to_pylist() == [
        "a cat", "a dog"]
    c = tmp_path / "p.csv"
    c.write_text("id,prompt\n1,a cat\n ,a dog\n")
    with pytest.raises(PromptError, match=r"row 1 has no id in prompts.id_column='id'"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=str(c), id_column="id"))
    c.write_text("id,prompt\n1,a cat\n2,a dog\n,\n,\n")  # a spreadsheet's blank trailing rows: dropped, not refused
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=str(c), id_column="id"))[
        "prompt_id"].to_pylist() == ["1", "2"]


def test_a_save_to_disk_folder_as_prompts_reads_its_caption_column_only(tmp_path, monkeypatch):
    """prompts=captions at a datasets save_to_disk training set: every Arrow file was read whole, images
    included, for one caption column, and a missing column was never named. Now only the named columns,
    a record batch at a time."""
    from memex import manifest, prompts

    folder = os.path.join(os.path.dirname(__file__), "data", "hf_datasets", "with_ids")
    kept, streamed = [], []
    real, real_column = manifest.read_arrow, prompts._arrow_column
    monkeypatch.setattr("memex.prompts.read_arrow", lambda *a: kept.append(a[3]) or real(*a))
    monkeypatch.setattr("memex.prompts._arrow_column", lambda *a: streamed.append(a[3]) or real_column(*a))
    t = load_prompts(PromptsConfig(source=PromptSource.captions, path=folder, caption_column="text"))
    assert t["prompt"].to_pylist() == [f"a photo {i}" for i in range(4)] and streamed == ["text"] and kept == []
    assert load_prompts(PromptsConfig(source=PromptSource.file, path=folder, column="text"))[
        "prompt"].to_pylist() == [f"a photo {i}" for i in range(4)] and kept == [["text"]]
    assert manifest.read_arrow("x", fsspec.filesystem("file"), manifest.hf_dataset_parts(
        fsspec.filesystem("file"), folder, folder, "x"), ["id"]).column_names == ["id"]
    with pytest.raises(PromptError, match=r"has no column 'caption' \(columns: \['image', 'text', 'id'\]\); "
                                          r"set prompts.caption_column"):
        load_prompts(PromptsConfig(source=PromptSource.captions, path=folder))


def test_a_text_under_two_ids_is_sampled_once_under_its_first_id(tmp_path):
    """prompts.id_column: one text under two ids (two images with one caption) was generated twice, as two
    prompts of the budget with the same conditioning; it is one prompt, under its first id."""
    path = tmp_path / "p.csv"
    path.write_text("pid,prompt\nimg-9,a red car\nimg-2,a blue car\nimg-5,a red car\nimg-7,a green car\n")
    t = load_prompts(PromptsConfig(source=PromptSource.file, path=str(path), id_column="pid", limit=3))
    assert t["prompt_id"].to_pylist() == ["img-9", "img-2", "img-7"]
    assert t["prompt"].to_pylist() == ["a red car", "a blue car", "a green car"]


def test_prompts_the_models_tokenizer_reads_as_one_are_sampled_once(tmp_path, tiny_models, caplog):
    """CLIP lowercases, collapses whitespace and cuts at model_max_length tokens (77; the tiny model's 16):
    "A Red  car" is "a red car" to the text encoder, so sampling both spent two prompts' budget on one
    conditioning, and under prompts.limit kept a distinct prompt out. The model's own tokenizer decides."""
    from memex.models import conditioning_keys

    same = conditioning_keys(tiny_models["pixel_text"])
    assert conditioning_keys(tiny_models["unconditional"]) is None  # no text, nothing to merge
    long_a, long_b = "the same long beginning, then a", "the same long beginning, then b"  # cut at 14 characters
    assert same(["A Red  car"]) == same(["a red car"]) and same(["a red car"]) != same(["a red car."])
    assert same([long_a]) == same([long_b])
    path = tmp_path / "p.txt"
    path.write_text("\n".join(["a red car", "A Red  car", long_a, "a blue car", long_b, "a red car.", "a cat"]))
    cfg = PromptsConfig(source=PromptSource.file, path=str(path), limit=4)
    with caplog.at_level("INFO", logger="memex.prompts"):
        t = load_prompts(cfg, same=same)
    assert t["prompt"].to_pylist() == ["a red car", long_a, "a blue car", "a red car."]
    assert "2 prompts are read by the model's tokenizer as the same tokens" in caplog.text
    assert load_prompts(cfg)["prompt"].to_pylist() == ["a red car", "A Red  car", long_a, "a blue car"]  # text alone

    # the near-duplicate ranking: the limit counts distinct conditionings, the best-ranked text kept
    from memex.prompts import rank_by_near_duplicates

    dups = pa.table({"caption": ["A Red  car", "a red car", long_b, long_a, "a dog"],
                     "near_duplicates": [9, 8, 7, 6, 5]})
    assert rank_by_near_duplicates(dups, 3, same)["prompt"].to_pylist() == ["A Red  car", long_b, "a dog"]
    assert rank_by_near_duplicates(dups, 3)["prompt"].to_pylist() == ["A Red  car", "a red car", long_b]


def test_a_run_started_before_the_tokenizer_merged_its_prompts_resumes_with_them(tmp_path, tiny_models, monkeypatch):
    """A run folder claimed with prompts the tokenizer now merges (started before 2026-12-07) resumes with its
    own prompts, under an explicit run.name (a nightly's) and a default one, instead of being refused or
    restarted in a new folder; a new run gets the merged ones."""
    from memex.layout import RunLayout
    from memex.stages import generate

    from conftest import compose

    path = tmp_path / "p.txt"
    path.write_text("a red car\nA Red  car\na blue car\n")

    def cfg(root, *extra):
        return compose(["model=local", f"model.path={tiny_models['pixel_text']}", "prompts=file",
                        f"prompts.path={path}", f"storage.root={root}", *extra], "generate")

    def prompts(root, name):
        layout = RunLayout(str(root), name)
        return layout.store.read_table(layout.prompts_path)["prompt"].to_pylist()

    merged = generate.prepare(cfg(tmp_path / "new"))
    assert prompts(tmp_path / "new", merged) == ["a red car", "a blue car"]
    names = []
    for extra in ([], ["run.name=nightly-abc"]):
        root = tmp_path / f"old{len(extra)}"
        with monkeypatch.context() as m:  # the code before: prompts merged by their text alone
            m.setattr(generate, "prompt_keys", lambda c: None)
            before = generate.prepare(cfg(root, *extra))
        assert prompts(root, before) == ["a red car", "A Red  car", "a blue car"]
        assert generate.prepare(cfg(root, *extra)) == before  # resumed, not refused, not a new folder
        assert prompts(root, before) == ["a red car", "A Red  car", "a blue car"]
        names.append(before)
    assert names[0] != merged and names[1] == "nightly-abc"  # the default name of the old prompts: its own folder

    # a text under two ids of prompts.id_column: each id was a prompt then; the run resumes with both
    ids = tmp_path / "ids.csv"
    ids.write_text("pid,prompt\nimg-9,a red car\nimg-2,a blue car\nimg-5,a red car\n")
    with_ids = lambda root, *extra: cfg(root, *extra)  # noqa: E731
    real = generate.load_prompts
    for extra in ([], ["run.name=nightly-ids"]):
        root = tmp_path / f"ids{len(extra)}"
        over = [f"prompts.path={ids}", "prompts.id_column=pid", *extra]
        with monkeypatch.context() as m:  # the code before: each id once
            m.setattr(generate, "load_prompts", lambda c, o, same=None, by_text=True: real(c, o, by_text=False))
            before = generate.prepare(with_ids(root, *over))
        assert generate.prepare(with_ids(root, *over)) == before
        layout = RunLayout(str(root), before)
        assert layout.store.read_table(layout.prompts_path)["prompt_id"].to_pylist() == ["img-9", "img-2", "img-5"]


def test_a_hub_ids_tokenizer_out_of_reach_leaves_the_prompts_to_their_text(monkeypatch, caplog):
    """A hub id not cached on a driver that cannot reach the hub is loaded by the actors (check_hub_model
    defers); its tokenizer then merges nothing, with a warning, instead of refusing the audit."""
    from memex import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "cached_snapshot", lambda *a, **k: None)
    monkeypatch.setattr(models, "check_hub_model", lambda *a, **k: None)  # no request leaves this machine
    with caplog.at_level("WARNING", logger="memex.models"):
        assert models.conditioning_keys("memex-tests/not-a-cached-model") is None
    assert "its tokenizer is neither cached here nor reachable" in caplog.text


def test_a_first_run_reads_its_prompts_once(tmp_path, tiny_models, monkeypatch):
    """The prompts as read before the tokenizer merged them are read only where a run folder may hold them: a
    first run (no folder of the model's default names, or no run.json under run.name) read and ranked its prompts
    twice, the whole caption column of a prompts=captions manifest each time."""
    from memex.stages import generate

    from conftest import compose

    path = tmp_path / "p.txt"
    path.write_text("a red car\nA Red  car\na blue car\n")
    reads = []
    real = generate.load_prompts
    monkeypatch.setattr(generate, "load_prompts", lambda *a, **k: reads.append(k.get("by_text", True)) or real(*a, **k))

    def cfg(*extra):
        return compose(["model=local", f"model.path={tiny_models['pixel_text']}", "prompts=file",
                        f"prompts.path={path}", f"storage.root={tmp_path / 'runs'}", *extra], "generate")

    first = generate.prepare(cfg())
    assert reads == [True]  # once: no run folder of this model existed
    reads.clear()
    assert generate.prepare(cfg()) == first and reads == [True]  # the folder holds the merged prompts: resumed
    reads.clear()
    generate.prepare(cfg("sampling.seed=7"))  # another default name of the model: its folders are looked at
    assert reads == [True, False]
    reads.clear()
    generate.prepare(cfg("run.name=nightly-x"))  # run.name with no run.json yet: nothing to resume
    assert reads == [True]
