import posixpath

import numpy as np
import pyarrow as pa
import pytest

from memex.layout import SAMPLES_SCHEMA, RunLayout, StorageError, shard_name
from memex.plan import SamplePlan, tie_shard_size


def test_shard_names_are_zero_padded_and_sort():
    names = [shard_name(i) for i in (0, 9, 10, 123456)]
    assert names[0] == "shard-000000.parquet" and names == sorted(names)


@pytest.mark.parametrize("n_prompts,per_prompt,shard,batch", [(3, 4, 5, 1), (1, 500, 64, 16), (7, 1, 3, 2),
                                                             (2, 3, 100, 7), (1, 2048, 64, 256)])
def test_a_fixed_plan_covers_every_unit_once_in_whole_batches(tmp_path, n_prompts, per_prompt, shard, batch):
    plan = SamplePlan.read(RunLayout(str(tmp_path), "r").store)
    plan.add_round(RunLayout(str(tmp_path), "r").store, None, n_prompts, 0, per_prompt, shard, batch)
    shards = plan.shards()
    units = [u for p in shards for u in plan.units(p)]
    assert units == [(p, i) for p in range(n_prompts) for i in range(per_prompt)]
    size = tie_shard_size(shard, batch)
    assert size % batch == 0 and size >= shard
    # only the last shard may hold a partial batch: padding is at most one partial batch per round
    assert all(p.stop - p.start == size for p in shards[:-1]) and 0 < shards[-1].stop - shards[-1].start <= size
    assert [p.index for p in shards] == list(range(len(shards)))


def test_rounds_add_samples_and_number_shards_after_the_last(tmp_path):
    store = RunLayout(str(tmp_path), "r").store
    plan = SamplePlan.read(store)
    plan.add_round(store, [0, 1, 2, 3], 4, 0, 2, 4, 4)  # 8 units: shards 0, 1
    plan.add_round(store, [3, 1], 2, 2, 8, 4, 4)  # 12 units: shards 2, 3, 4
    again = SamplePlan.read(store)  # read back from rounds/round-*.json, as a rerun does
    assert [r.to_json() for r in again.rounds] == [r.to_json() for r in plan.rounds]
    shards = again.shards()
    assert [s.index for s in shards] == [0, 1, 2, 3, 4] and again.shards([1])[0].index == 2
    units = [u for s in shards for u in again.units(s)]
    assert len(units) == len(set(units)) == 20
    assert sorted(i for p, i in units if p == 3) == list(range(8)) and sorted(i for p, i in units if p == 0) == [0, 1]
    for p in range(4):  # shards_of names exactly the shards holding a prompt's samples
        assert set(again.shards_of(p)) == {s.index for s in shards if any(q == p for q, _ in again.units(s))}
        assert again.samples_of(p) == sum(q == p for q, _ in units)
    with pytest.raises(StorageError, match="round 1"):  # a rerun deciding differently is refused
        SamplePlan(again.rounds[:1]).add_round(store, [3], 1, 2, 8, 4, 4)


def test_a_stop_is_written_and_a_rerun_with_another_rule_is_refused(tmp_path, monkeypatch):
    """budget=adaptive: a decision to stop is written (a round of no prompts) with the rule that made it
    (budget.continue_factor, continue_triage_z), as every later round's is. A rerun reads it and decides
    nothing again; a rerun with another rule is refused, naming the key. It was neither: a finished run
    whose round 1 stopped, rerun with a larger continue_factor, wrote round 1, generated and matched it,
    never filtered it (the filter's units were complete) and returned the old summary."""
    from memex.plan import SamplePlan
    from memex.stages import audit, generate, match

    from conftest import compose

    calls = []
    monkeypatch.setattr(generate, "run", lambda cfg, name: calls.append("generate"))
    monkeypatch.setattr(match, "match_shards", lambda cfg, name: calls.append("match"))
    monkeypatch.setattr(audit, "read_run_prompts", lambda layout: pa.table({"prompt_id": ["a", "b", "c"]}))
    decided = []
    monkeypatch.setattr(audit, "continuing_prompts", lambda cfg, layout, last: decided.append(last.index) or [])
    base = [f"storage.root={tmp_path}", "model.path=/planted", "triage=none", "budget=adaptive",
            "budget.rounds=[4,16]", "sampling.samples_per_prompt=16"]
    layout = RunLayout(str(tmp_path), "r")
    audit.generate_in_rounds(compose(base, config_name="audit"), "r", layout)
    plan = SamplePlan.read(layout.store)
    assert [(r.n_prompts, r.lo, r.hi) for r in plan.rounds] == [(3, 0, 4), (0, 4, 16)] and decided == [0]
    assert plan.rounds[0].rule is None
    assert plan.rounds[1].rule == {"continue_factor": 1.2, "continue_triage_z": 3.0, "triage": "none",
                                   "triage_seeds": 4, "triage_steps": 1, "match_threshold": 0.15,
                                   "match_distance": "tiled_l2"}
    assert calls == ["generate", "match"] and plan.shards() == plan.shards([0])  # the stop round has no shard

    calls.clear()
    audit.generate_in_rounds(compose(base, config_name="audit"), "r", layout)  # the same rule: read, not decided
    assert decided == [0] and calls == ["generate", "match"] and len(SamplePlan.read(layout.store).rounds) == 2
    calls.clear()
    with pytest.raises(StorageError, match=r"round 1, whose prompts were chosen with other settings "
                                           r"\(continue_factor: was 1.2, now 2.0\)"):
        audit.generate_in_rounds(compose(base + ["budget.continue_factor=2.0"], config_name="audit"), "r", layout)
    assert calls == [] and decided == [0] and len(SamplePlan.read(layout.store).rounds) == 2  # nothing changed
    # triage's settings decide the rule's z-scores (and previews' distances): a resume with triage on (or
    # off) planned another round, and nothing refused it (no triage/ folder was claimed)
    with pytest.raises(StorageError, match=r"round 1, whose prompts were chosen with other settings "
                                           r"\(triage: was 'none', now 'auto'\)"):
        audit.generate_in_rounds(compose([b for b in base if b != "triage=none"], config_name="audit"), "r", layout)
    # a round written before the triage keys were recorded is checked on the keys it holds
    old = plan.rounds[1].to_json()
    old["rule"] = {"continue_factor": 1.2, "continue_triage_z": 3.0}
    layout.store.write_json(SamplePlan.path(layout.store, 1), old)
    audit.generate_in_rounds(compose([b for b in base if b != "triage=none"], config_name="audit"), "r", layout)
    assert decided == [0] and len(SamplePlan.read(layout.store).rounds) == 2
    calls.clear()
    # a later bound changed after the stop: the stop holds no sample, so the run resumes (and stays stopped)
    audit.generate_in_rounds(compose(base[:-2] + ["budget.rounds=[4,32]", "sampling.samples_per_prompt=32"],
                                     config_name="audit"), "r", layout)
    assert calls == ["generate", "match"] and decided == [0] and len(SamplePlan.read(layout.store).rounds) == 2


def test_an_audit_resumed_with_another_budget_is_refused_before_it_generates(tmp_path):
    """The budget is not in run.json: a fixed and an adaptive audit of one model share the default run
    name. A folder holding a fixed round [0, 16) resumed with budget.rounds=[4,16] went on to round 1,
    samples [4, 16) again (byte-identical copies at distance 0, false cliques); rounds [16, 64] resumed
    as [32, 64] never made samples [16, 32). Each is refused, naming the key, before generation (no
    Ray here), as is another triage.keep; the budget the rounds were written with resumes."""
    from memex.stages import audit

    from conftest import compose

    layout = RunLayout(str(tmp_path), "r")
    SamplePlan.read(layout.store).add_round(layout.store, None, 3, 0, 16, 4, 4)
    base = [f"storage.root={tmp_path}", "model.path=/planted", "triage=none", "sampling.samples_per_prompt=16"]
    with pytest.raises(StorageError, match=r"samples \[\(0, 16\)\], and this run asks for \[\(0, 4\), \(4, 16\)\] "
                       r"\(budget.rounds\)"):
        audit.generate_in_rounds(compose(base + ["budget=adaptive", "budget.rounds=[4,16]"], config_name="audit"),
                                 "r", layout)
    SamplePlan.read(layout.store).check_budget(layout.store, [16], None, "budget=fixed")  # as written: resumes
    with pytest.raises(StorageError, match=r"other prompts \(triage.keep\)"):
        SamplePlan.read(layout.store).check_budget(layout.store, [16], [0, 2], "budget=fixed")

    layout = RunLayout(str(tmp_path), "a")
    plan = SamplePlan.read(layout.store)
    plan.add_round(layout.store, None, 3, 0, 16, 4, 4)
    plan.add_round(layout.store, [1], 3, 16, 64, 4, 4)
    with pytest.raises(StorageError, match=r"\(16, 64\)\], and this run asks for \[\(0, 16\), \(16, 32\), "):
        audit.generate_in_rounds(compose(base + ["budget=adaptive", "budget.rounds=[16,32,64]",
                                                 "sampling.samples_per_prompt=64"], config_name="audit"), "a", layout)
    with pytest.raises(StorageError, match=r"budget=fixed, sampling.samples_per_prompt"):
        audit.triage_and_generate(compose(base + ["sampling.samples_per_prompt=64"], config_name="audit"), "a", layout)
    # ... and before a triage stage of its own runs (its previews were made and scored first, their cost then
    # counted in the adaptive audit's summary)
    preview = [b for b in base if b != "triage=none"] + ["triage=preview", "sampling.samples_per_prompt=64"]
    with pytest.raises(StorageError, match=r"budget=fixed, sampling.samples_per_prompt"):
        audit.triage_and_generate(compose(preview, config_name="audit"), "a", layout)
    assert not layout.previews.complete() and not layout.triage.complete()
    assert len(SamplePlan.read(layout.store).rounds) == 2 and not layout.samples.complete()  # nothing changed


def test_triage_resumed_with_another_chunk_size_or_preview_settings_is_refused(tmp_path):
    """triage.prompts_per_task is triage's unit of resume (chunk c = prompts [c*step, (c+1)*step)), but
    it was not recorded: chunks 0-4 of 100 prompts done at 10 and resumed at 20 counted as done, and
    prompts 50-99 were never scored (with triage.keep, never generated). And previews/ had no settings
    of its own: with triage/ deleted to redo it at other triage.steps, the old previews were reused.
    Both refused before any work (no Ray here); the default chunk size is left out of the record, so
    folders triaged before it was recorded resume."""
    from memex.layout import PROMPTS_SCHEMA
    from memex.stages import triage

    from conftest import compose

    for run in ("r", "p"):
        layout = RunLayout(str(tmp_path), run)
        layout.store.write_table(layout.prompts_path, pa.table({"prompt_id": ["a"], "prompt": ["x"]},
                                                                schema=PROMPTS_SCHEMA))
    layout = RunLayout(str(tmp_path), "r")
    base = [f"storage.root={tmp_path}", "model.path=/planted", "triage.seeds=2", "triage.steps=1"]
    layout.triage.claim({"triage": {"seeds": 2, "steps": 1}}, "a run folder")  # as an earlier triage left it
    with pytest.raises(StorageError, match=r"triage/ .*prompts_per_task"):
        triage.run(compose(base + ["triage.prompts_per_task=10"], config_name="audit"), "r")

    preview = base + ["triage=preview", "budget=adaptive", "budget.rounds=[2,16]", "sampling.samples_per_prompt=16"]
    layout = RunLayout(str(tmp_path), "p")
    layout.previews.claim({"triage": {"kind": "preview", "seeds": 2, "steps": 2, "match_k": 8}}, "a run folder")
    with pytest.raises(StorageError, match=r"previews/ .*steps"):
        triage.run(compose(preview + ["triage.steps=1"], config_name="audit"), "p")
    assert not layout.store.exists(layout.triage.settings_path)  # refused before triage/ was claimed


def test_preview_triage_against_another_index_is_refused(tmp_path, monkeypatch):
    """triage=preview scores a prompt by its previews' distances to the index's pictures. A rerun of
    the run folder against another index (trainset.alpha=drop, other training images) reused the old
    distances: triage/ recorded no index key, where matches/ does. Refused before any work (the actor
    pool is replaced by a sentinel: no Ray here), naming index_key; previews/ is not touched."""
    from memex.layout import PROMPTS_SCHEMA
    from memex.membership import IndexInfo
    from memex.stages import triage

    from conftest import compose

    class PoolStarted(Exception):
        pass

    def pool(*a, **k):
        raise PoolStarted

    monkeypatch.setattr(triage.runner, "run_actor_pool", pool)
    layout = RunLayout(str(tmp_path), "p")
    layout.store.write_table(layout.prompts_path, pa.table({"prompt_id": ["a"], "prompt": ["x"]},
                                                            schema=PROMPTS_SCHEMA))
    cfg = compose([f"storage.root={tmp_path}", "model.path=/planted", "triage=preview", "triage.seeds=2",
                   "triage.steps=2", "budget=adaptive", "budget.rounds=[2,16]", "sampling.samples_per_prompt=16"],
                  config_name="audit")
    for key in ("aaaa", "aaaa"):  # the first run (stopped at its actor pool), then a resume against the same index
        layout.store.write_json(layout.index_json, IndexInfo(str(tmp_path / "_index"), key, [(0, 4)], "l2", 8, 4,
                                                             4, 0).to_json())
        with pytest.raises(PoolStarted):
            triage.run(cfg, "p")
    before = layout.store.read_json(layout.previews.settings_path)
    layout.store.write_json(layout.index_json, IndexInfo(str(tmp_path / "_index"), "bbbb", [(0, 4)], "l2", 8, 4, 4,
                                                         0).to_json())
    with pytest.raises(StorageError, match=r"triage/ .*index_key"):
        triage.run(cfg, "p")
    assert layout.store.read_json(layout.previews.settings_path) == before
    # a folder triaged before the index was recorded: adopts it (as it was) and resumes
    recorded = layout.store.read_json(layout.triage.settings_path)
    layout.store.write_json(layout.triage.settings_path, {"triage": recorded["triage"]})
    with pytest.raises(PoolStarted):
        triage.run(cfg, "p")
    assert layout.store.read_json(layout.triage.settings_path)["index_key"] == "bbbb"


def _table(n):
    cols = {f.name: pa.array([0] * n if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
                              else [b"x"] * n if pa.types.is_binary(f.type) else ["s"] * n, f.type)
            for f in SAMPLES_SCHEMA}
    return pa.table(cols, schema=SAMPLES_SCHEMA)


def test_only_marked_shards_count(tmp_path):
    lay = RunLayout(str(tmp_path), "r1")
    lay.samples.write_shard(0, _table(3))
    # a shard file without a marker (a writer killed between move and marker) is not complete
    (tmp_path / "r1" / "samples" / shard_name(1)).write_bytes(b"partial")
    assert lay.samples.complete() == [0]
    assert lay.samples.read().num_rows == 3
    assert not list((tmp_path / "r1" / "samples").glob("_tmp-*"))  # temp files were moved into place


def test_damaged_or_missing_unit_files_are_named_with_the_fix(tmp_path):
    """A marked unit whose file was truncated, or removed, and a JSON file cut short: a StorageError
    naming the file (one path, or the folder of a dataset read) and how to recover, not pyarrow's or
    json's bare error."""
    lay = RunLayout(str(tmp_path), "r1")
    for i in range(3):
        lay.samples.write_shard(i, _table(2))
    folder = tmp_path / "r1" / "samples"
    (folder / shard_name(1)).write_bytes((folder / shard_name(1)).read_bytes()[:50])
    # the damaged one of several named, with its own marker (it said "one of 3 files", and its example marker
    # shard-000012 read as the culprit)
    with pytest.raises(StorageError) as e:
        lay.samples.read()
    assert str(e.value).startswith(f"{folder / shard_name(1)} is not readable Parquet") and \
        f"Remove it and its marker ({folder}/_markers/{shard_name(1).replace('.parquet', '.json')})" in str(e.value) \
        and "shard-000012" not in str(e.value), str(e.value)
    with pytest.raises(StorageError, match=f"{folder / shard_name(1)} is not readable Parquet"):
        lay.store.read_table(lay.samples.file(1))
    (folder / shard_name(2)).unlink()
    with pytest.raises(StorageError, match=f"{folder / shard_name(2)} is not readable Parquet.*FileNotFoundError"):
        lay.store.read_table(lay.samples.file(2))
    (folder / "_markers" / "shard-000000.json").write_text('{"rows": 2')
    with pytest.raises(StorageError, match=r"_markers/shard-000000.json is not readable JSON \(JSONDecodeError"):
        lay.samples.read_marker(0)
    assert lay.store.read_json(lay.store.join("absent.json")) is None  # absent is not damaged


@pytest.mark.parametrize("compression", ["zstd", "snappy", "gzip", "none"])
def test_a_unit_damaged_inside_its_pages_is_named_but_a_read_failure_is_not(tmp_path, monkeypatch, compression):
    """Bytes changed in the middle of a file (a bad disk, a partial sync over an old copy): arrow raises a bare
    OSError ("Corrupt snappy compressed data", "Unexpected end of stream"), which escaped the message that
    names the file and its recovery. A storage failure is an OSError too (a timeout read through fsspec),
    and is not called damage: removing the file would be the wrong advice. It is a StorageError naming the file and
    what to check (it was raised raw: a traceback at the CLI), the original error its cause."""
    import pyarrow.parquet as pq

    from memex.storage import Store

    store = Store(str(tmp_path))
    path = store.join("u.parquet")
    pq.write_table(pa.table({"x": np.arange(100_000), "y": [f"row {i}" for i in range(100_000)]}), path,
                   compression=compression)
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 4, len(data) // 2):
        data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))
    with pytest.raises(StorageError, match=r"(?s)u.parquet is not readable Parquet \(OSError: .*Remove it"):
        store.read_table(path)

    for failure in (OSError("Read timeout on endpoint URL"), TimeoutError("timed out"),
                    PermissionError(13, "Access Denied: the credentials expired"),
                    ConnectionResetError(104, "Connection reset by peer")):
        def fail(*a, failure=failure, **kw):
            raise failure

        monkeypatch.setattr(pq, "read_table", fail)
        with pytest.raises(StorageError) as e:
            store.read_table(path)
        assert e.value.__cause__ is failure, e.value
        assert str(e.value).startswith(f"cannot read {path}: {type(failure).__name__}") and \
            "storage.options" in str(e.value) and "not readable" not in str(e.value) and "Remove" not in str(e.value)


def _claim_run(lay, settings):
    lay.store.claim(lay.run_json, settings, f"run folder {lay.uri}", "Use another run.name for a new experiment.")


def test_claim_run_refuses_other_settings_and_changes_nothing(tmp_path):
    lay = RunLayout(str(tmp_path), "r1")
    _claim_run(lay, {"seed": 0, "steps": 50})
    _claim_run(lay, {"seed": 0, "steps": 50})  # same settings: resume
    before = (tmp_path / "r1" / "run.json").read_bytes()
    with pytest.raises(StorageError, match="steps: was 50, now 10.*another run.name"):
        _claim_run(lay, {"seed": 0, "steps": 10})
    assert (tmp_path / "r1" / "run.json").read_bytes() == before
    # nested sections: the keys that differ, dotted, not both whole sections
    lay2 = RunLayout(str(tmp_path), "r2")
    _claim_run(lay2, {"sampling": {"batch_size": 16, "guidance_scale": 7.5, "seed": 0}, "model": "m"})
    with pytest.raises(StorageError) as e:
        _claim_run(lay2, {"sampling": {"batch_size": 32, "guidance_scale": 7.5, "seed": 0}, "model": "m"})
    assert "other settings (sampling.batch_size: was 16, now 32)." in str(e.value)


def test_unreachable_bucket_names_the_uri(s3_server):
    lay = RunLayout("s3://no-such-bucket/runs", "r1", s3_server)
    with pytest.raises(StorageError, match="s3://no-such-bucket/runs/r1.*storage.root"):
        lay.store.check_writable("run folder", "storage.root")
    assert not lay.store.fs.exists("no-such-bucket")  # the typo did not create a bucket


def test_s3_layout_roundtrip(s3_server, bucket):
    lay = RunLayout(f"s3://{bucket}/runs", "r1", s3_server)
    lay.store.check_writable("run folder", "storage.root")
    lay.samples.write_shard(2, _table(4))
    assert lay.samples.complete() == [2]
    assert lay.samples.read().num_rows == 4
    assert lay.uri == f"s3://{bucket}/runs/r1"


def test_the_driver_sees_markers_ray_workers_wrote_after_it_listed_them_on_s3(s3_server, bucket):
    """Markers and _SUCCESS.json are written by other processes (Ray workers), and s3fs answers exists()
    from a listing it cached with no expiry: once the driver had listed _markers/ (a resumed stage's
    complete(); every glob on fsspec < 2026.4), a unit a worker marked after that read as not complete,
    and its marker as None (the stage failed "units did not complete", unet_work undercounted). Each
    completion read now drops the cached listing first."""
    driver = RunLayout(f"s3://{bucket}/runs", "r1", s3_server)
    worker = RunLayout(f"s3://{bucket}/runs", "r1", {**s3_server, "skip_instance_cache": True})  # its own client
    assert driver.store.fs is not worker.store.fs
    worker.samples.write_shard(0, _table(2))
    assert driver.samples.complete() == [0]
    driver.store.fs.ls(posixpath.dirname(driver.samples.marker(0)))  # cached, as a glob on older fsspec does
    driver.store.fs.ls(driver.samples.path)
    worker.samples.write_shard(1, _table(3))
    worker.samples.mark_success({"rows": 5})
    assert driver.samples.is_complete(1) and driver.samples.read_marker(1)["rows"] == 3
    assert driver.samples.complete() == [0, 1] and driver.samples.success() == {"rows": 5}


def test_pages_on_s3_are_served_as_html(s3_server, bucket):
    """s3fs's pipe_file sets no Content-Type, and the move keeps the temp object's: report/index.html
    was binary/octet-stream, so a browser (or a static website on the bucket) downloaded the report
    instead of showing it."""
    import boto3

    lay = RunLayout(f"s3://{bucket}/runs", "r1", s3_server)
    lay.store.write_bytes(lay.report_path, b"<!doctype html><p>report</p>")
    lay.store.write_json(lay.summary_path, {"a": 1})
    s3 = boto3.client("s3", endpoint_url=s3_server["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    head = s3.head_object(Bucket=bucket, Key="runs/r1/report/index.html")
    assert head["ContentType"] == "text/html; charset=utf-8"
    assert s3.head_object(Bucket=bucket, Key="runs/r1/summary.json")["ContentType"].startswith("application/json")


def test_summary_and_matched_images_live_outside_matches_and_old_run_folders_are_read(tmp_path):
    """matches/ holds match shards only (pyarrow reads it as one dataset); a run folder written when
    summary.json and train_images.parquet were kept in matches/ is still read."""
    lay = RunLayout(str(tmp_path), "r1")
    assert lay.summary_path == str(tmp_path / "r1" / "summary.json")
    assert lay.matched_train_path == str(tmp_path / "r1" / "matched_train_images.parquet")
    assert lay.read_summary() is None and lay.matched_train_source() is None
    lay.store.write_json(lay.legacy_summary_path, {"old": True})
    lay.store.write_table(lay.legacy_matched_train_path, pa.table({"train_gid": [1]}))
    assert lay.read_summary() == {"old": True} and lay.matched_train_source() == lay.legacy_matched_train_path
    lay.store.write_json(lay.summary_path, {"old": False})
    lay.store.write_table(lay.matched_train_path, pa.table({"train_gid": [2]}))
    assert lay.read_summary() == {"old": False} and lay.matched_train_source() == lay.matched_train_path


def test_a_samples_shard_keeps_each_prompts_generations_in_row_groups_of_their_own(tmp_path):
    """500 samples a prompt in shards of 512: most prompts span two shards, and one shard holds the
    tails of two prompts. As one row group a shard was read whole by each of its prompts (the filter
    and the report read a prompt's samples with a prompt_id filter). In row groups of 64 generations,
    a group's prompt_id statistics name its prompt, so a reader of one prompt skips the others'."""
    import numpy as np
    import pyarrow.parquet as pq

    from memex.layout import SAMPLES_ROW_GROUP
    from memex.prompts import prompt_id

    from conftest import plant_run

    n = SAMPLES_ROW_GROUP
    img = np.zeros((4, 4, 3), np.uint8)
    layout = plant_run(tmp_path, "r", {p: [img] * n for p in ("a", "b", "c")}, shard_size=2 * n)
    md = pq.ParquetFile(layout.samples.file(0)).metadata  # prompts a and b
    col = md.schema.to_arrow_schema().get_field_index("prompt_id")
    stats = [md.row_group(i).column(col).statistics for i in range(md.num_row_groups)]
    assert [(s.min, s.max) for s in stats] == [(prompt_id("a"),) * 2, (prompt_id("b"),) * 2]
    got = layout.store.read_table(layout.samples.file(0), filters=[("prompt_id", "=", prompt_id("b"))])
    assert got.num_rows == n and set(got["prompt_id"].to_pylist()) == {prompt_id("b")}


def test_temp_files_of_killed_writes_outside_stage_folders_are_swept(tmp_path):
    """Writes a kill cut short left `_tmp-` files where no runner sweeps: a run folder's own files
    (summary.json), the index's quarantine/ and links/, a mia folder's shadow_models/ (a model's weights
    each kill). Swept under the folder's lease; a write-probe and a lease's own temp file are left alone."""
    from memex.storage import Store

    store = Store(str(tmp_path / "run"))
    left = ["_tmp-1a-summary.json", "report/_tmp-2b-index.html", "shadow_models/shadow-000000/_tmp-3c-unet.safetensors"]
    kept = ["_tmp-probe-9z", "_tmp-4d-_lease.json", "summary.json", "shadow_models/shadow-000000/unet.safetensors"]
    for name in left + kept:
        (tmp_path / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / name).write_bytes(b"x")
    assert store.sweep_temp("") == 1  # the folder's own files, not its sub-folders'
    assert store.sweep_temp("", deep=True) == 2
    assert not any((tmp_path / "run" / n).exists() for n in left)
    assert all((tmp_path / "run" / n).exists() for n in kept)


def test_matches_of_cliques_record_the_filter_that_made_them(tmp_path):
    """match.candidates=cliques (preset=paper), an audit killed part way through matching, the filter
    then redone with other settings (candidates/ deleted, as its refusal advises): the units matched
    against the old cliques were kept, the rest matched against the new ones, and the summary counted
    both. matches/ now records the cliques' filter settings and refuses others; a folder matched before
    they were recorded adopts them."""
    from memex.membership import IndexInfo
    from memex.stages.match import claim_settings

    from conftest import compose

    layout = RunLayout(str(tmp_path), "r")
    cfg = compose([f"storage.root={tmp_path}", "model.path=/planted", "match.candidates=cliques"], config_name="audit")
    info = IndexInfo(str(tmp_path / "_index"), "k", [(0, 4)], "l2", 8, 4, 4, 0)
    layout.candidates.claim({"edge_threshold": 0.15, "min_clique": 5}, "a run folder")
    claim_settings(cfg, layout, info)
    recorded = layout.store.read_json(layout.matches.settings_path)
    assert recorded["filter"] == {"edge_threshold": 0.15, "min_clique": 5}
    layout.store.fs.rm(layout.candidates.path, recursive=True)  # the refusal's advice, then the filter redone
    layout.candidates.claim({"edge_threshold": 0.1, "min_clique": 5}, "a run folder")
    with pytest.raises(StorageError, match=r"matches/ .*edge_threshold"):
        claim_settings(cfg, layout, info)
    # a folder matched before the filter was recorded: adopts it, as it was
    old = {k: v for k, v in recorded.items() if k != "filter"}
    layout.store.write_json(layout.matches.settings_path, old)
    claim_settings(cfg, layout, info)
    adopted = layout.store.read_json(layout.matches.settings_path)
    assert adopted["filter"]["edge_threshold"] == 0.1 and {k: v for k, v in adopted.items() if k != "filter"} == old


def test_a_triage_left_by_another_audit_of_the_folder_is_not_read_as_this_one(tmp_path, monkeypatch):
    """An adaptive audit finished with the default triage (scores from its samples), then rerun with
    triage=preview: the whole preview stage ran (160 UNet evaluations a prompt) before the rounds' rule
    refused it, and its triage/ stayed. The next rerun with the first settings read that triage/ as its
    own: preview scores, distances and UNet evaluations the audit never had. Now the rounds' rule is
    checked before the stage, and triage/ is read only by a config that runs the stage."""
    from memex.layout import PROMPTS_SCHEMA, TRIAGE_SCHEMA
    from memex.stages import audit
    from memex.stages import triage as triage_stage

    from conftest import compose

    layout = RunLayout(str(tmp_path), "r")
    layout.store.write_table(layout.prompts_path, pa.table({"prompt_id": ["a", "b"], "prompt": ["x", "y"]},
                                                            schema=PROMPTS_SCHEMA))
    base = [f"storage.root={tmp_path}", "model.path=/planted", "budget=adaptive", "budget.rounds=[4,16]",
            "sampling.samples_per_prompt=16"]
    first = compose(base, config_name="audit")  # triage=auto: the samples' free scores
    plan = SamplePlan([])
    plan.add_round(layout.store, None, 2, 0, 4, 64, 16)
    plan.add_round(layout.store, [0], 2, 4, 16, 64, 16, audit.round_rule(first))

    class TriageRan(Exception):
        pass

    def stage(cfg, run_name):
        raise TriageRan

    monkeypatch.setattr(triage_stage, "run", stage)
    with pytest.raises(StorageError, match=r"round 1, whose prompts were chosen with other settings \(triage"):
        audit.triage_and_generate(compose([*base, "triage=preview"], config_name="audit"), "r", layout)

    # a triage/ another config left (preview scores and distances): not this config's triage
    layout.triage.write_shard(0, pa.table({"prompt_id": ["a", "b"], "prompt": ["x", "y"], "score": [-0.1, -0.5],
                                           "unet_evaluations": [160, 160], "distance": [0.1, 0.5],
                                           "train_gid": [3, 4]}, schema=TRIAGE_SCHEMA))
    layout.triage.mark_success({"unet_evaluations": 320})
    assert triage_stage.prompt_scores(first, layout) == {} and triage_stage.preview_distances(first, layout) == {}
    preview = compose([*base, "triage=preview"], config_name="audit")
    assert triage_stage.preview_distances(preview, layout) == {"a": pytest.approx(0.1), "b": 0.5}


def test_a_copy_at_exactly_the_threshold_continues_at_continue_factor_one(tmp_path):
    """match decides a copy in float32 (distances.within): a generation at exactly tiled l2 0.15 (a uint8
    case) is extracted. The continue rule compared the float32 column with the float64 0.15, so at
    budget.continue_factor=1.0 (the least allowed) that verified copy did not continue its prompt."""
    from memex.layout import MATCHES_SCHEMA, PROMPTS_SCHEMA
    from memex.stages import audit

    from conftest import compose

    layout = RunLayout(str(tmp_path), "r")
    layout.store.write_table(layout.prompts_path, pa.table({"prompt_id": ["a", "b"], "prompt": ["x", "y"]},
                                                            schema=PROMPTS_SCHEMA))
    cfg = compose([f"storage.root={tmp_path}", "model.path=/planted", "budget=adaptive", "budget.rounds=[4,16]",
                   "sampling.samples_per_prompt=16",
                   "budget.continue_factor=1.0", "triage=none"], config_name="audit")
    plan = SamplePlan([])
    first = plan.add_round(layout.store, None, 2, 0, 4, 64, 16)
    at = float(np.float32(0.15))  # what a uint8 pair's worst tile at 0.15 reads in float32
    row = {"prompt": "x", "train_gid": 1, "train_id": "t1", "train_caption": "c", "embed_distance": 0.1,
           "neighbor_rank": 0, "train_detail": 0.3, "margin": 0.2}
    layout.matches.write_shard(0, pa.Table.from_pylist([
        {**row, "sample_id": "a/0", "prompt_id": "a", "distance": at, "extracted": True},
        {**row, "sample_id": "b/0", "prompt_id": "b", "distance": 0.16, "extracted": False}], schema=MATCHES_SCHEMA))
    assert audit.continuing_prompts(cfg, layout, first) == [0]


def test_a_unit_and_its_marker_reach_the_disk_before_their_names(tmp_path, monkeypatch):
    """A unit file was renamed into place, then its marker written, with no fsync: after a power cut
    (not a process crash) ext4 or xfs can keep both renames over a file whose blocks never reached the
    disk, and the rerun skipped the unit as done. Each local write is now flushed before its rename,
    and the folder after it: the data file's, then the marker's."""
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    lay = RunLayout(str(tmp_path), "r1")
    lay.samples.write_shard(0, _table(2))
    folder = str(tmp_path / "r1" / "samples")
    names = [p.replace(folder, "<samples>") for p in synced]
    data = next(i for i, n in enumerate(names) if n.startswith("<samples>/_tmp-") and n.endswith(shard_name(0)))
    marker = next(i for i, n in enumerate(names) if n.startswith("<samples>/_markers/_tmp-"))
    assert names[data + 1] == "<samples>" and data < marker and names[marker + 1] == "<samples>/_markers", names


def test_an_index_json_of_another_memex_version_is_named(tmp_path):
    """An index.json (or an index's _SUCCESS.json) with a key this memex does not know, written by a newer one,
    or lacking one it needs: a bare TypeError from the dataclass, naming no file."""
    from memex.membership import IndexInfo, read_info

    good = IndexInfo(str(tmp_path / "_index"), "k", [(0, 4)], "l2", 8, 4, 4, 0).to_json()
    assert IndexInfo.from_json(good).shards == [(0, 4)]
    layout = RunLayout(str(tmp_path), "run")
    for d, what in ((good | {"tiles": 16}, r"keys this memex does not know \(tiles\)"),
                    ({k: v for k, v in good.items() if k != "dim"}, "no dim")):
        layout.store.write_json(layout.index_json, d)
        with pytest.raises(StorageError, match=rf"{tmp_path}/run/index.json has {what}: .*delete the index folder"):
            read_info(layout)


def test_a_stop_round_does_not_change_the_generations_summary_of_a_rerun(tmp_path, monkeypatch):
    """samples/_SUCCESS.json counted every round file: the first run generated before its stop round was written
    (rounds 1), a rerun of the finished audit counted the stop too (rounds 2), and the re-matches of the run,
    which record its generations' summary, were refused ("rounds: was 1, now 2") though nothing was generated
    again. It counts the rounds that sample."""
    from memex.layout import PROMPTS_SCHEMA
    from memex.plan import SamplePlan
    from memex.stages import generate, rematch

    from conftest import compose

    monkeypatch.setattr(generate.runner, "run_actor_pool", lambda *a, **k: 0)
    cfg = compose([f"storage.root={tmp_path}", "model.path=/planted", "sampling.samples_per_prompt=16"],
                  config_name="audit")
    layout = RunLayout(str(tmp_path), "r")
    layout.store.write_table(layout.prompts_path, pa.table({"prompt_id": ["a", "b"], "prompt": ["x", "y"]},
                                                            schema=PROMPTS_SCHEMA))
    SamplePlan([]).add_round(layout.store, None, 2, 0, 4, 8, 4)
    first = generate.generate_all(cfg, "r", layout)
    before = rematch.source_generations(layout)
    plan = SamplePlan.read(layout.store)
    plan.add_round(layout.store, [], 2, 4, 16, 8, 4, {"continue_factor": 1.2})  # the decision to stop
    again = generate.generate_all(cfg, "r", layout)
    assert first["rounds"] == again["rounds"] == 1 and rematch.source_generations(layout) == before
