import pyarrow as pa
import pytest

from memex.layout import SAMPLES_SCHEMA, RunLayout, StorageError, iter_units, plan_shards, shard_name


def test_shard_names_are_zero_padded_and_sort():
    names = [shard_name(i) for i in (0, 9, 10, 123456)]
    assert names[0] == "shard-000000.parquet" and names == sorted(names)


@pytest.mark.parametrize("n_prompts,per_prompt,shard", [(3, 4, 5), (1, 500, 64), (7, 1, 3), (2, 3, 100)])
def test_plan_covers_every_unit_exactly_once(n_prompts, per_prompt, shard):
    plans = plan_shards(n_prompts, per_prompt, shard)
    units = [u for p in plans for u in iter_units(p, per_prompt)]
    assert units == [(p, i) for p in range(n_prompts) for i in range(per_prompt)]
    assert all(0 < p.stop - p.start <= shard for p in plans)
    assert [p.index for p in plans] == list(range(len(plans)))


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
