"""The generation stage on a real local Ray head: rows, resume, S3, bad input.

A SIGKILLed generation and its rerun: tests/test_kill_points.py (the audit killed in each stage);
`ray job submit --working-dir`: tests/test_audit.py (the demo audit) and tests/test_nightly.py."""

from __future__ import annotations

import os

import pyarrow.dataset as pds
import pytest

from memex.config import SamplingConfig
from memex.images import decode, encode_png
from memex.layout import SAMPLES_SCHEMA, RunLayout
from memex.models import load_model
from memex.prompts import prompt_id
from memex.sampling import Sampler, sample_seed
from memex.stages import generate

from conftest import compose

PROMPTS = ["a red apple", "a lighthouse at dusk", "blue logo"]


@pytest.fixture
def prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def _overrides(tiny_models, prompt_file, root, *extra):
    return ["model=local", f"model.path={tiny_models['pixel_text']}", "prompts=file", f"prompts.path={prompt_file}",
            f"storage.root={root}", "sampling.num_inference_steps=3", "sampling.batch_size=4",
            "sampling.samples_per_prompt=5", "sampling.shard_size=4", *extra]


def _generate(cfg) -> dict:
    """`memex generate`: claim the run folder, then the stage (what cli.generate_main does)."""
    return generate.run(cfg, generate.prepare(cfg))


def _check_rows(table, n_per_prompt=5, run_seed=0):
    """Exactly one row per (prompt, sample index), with the derived seed and a decodable PNG."""
    expected = {(prompt_id(p), i) for p in PROMPTS for i in range(n_per_prompt)}
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected
    for row in table.slice(0, 4).to_pylist():
        assert row["seed"] == sample_seed(run_seed, row["prompt_id"], row["sample_index"])
        assert row["sample_id"] == f"{row['prompt_id']}/{row['sample_index']}"
        assert row["image"].startswith(b"\x89PNG\r\n\x1a\n")
        img = decode(row["image"])
        assert img.shape == (row["height"], row["width"], 3) == (16, 16, 3)


def test_local_run_writes_expected_rows_and_resumes(ray_head, tiny_models, prompt_file, tmp_path):
    cfg = compose(_overrides(tiny_models, prompt_file, tmp_path / "runs", "run.name=r1"))
    s = _generate(cfg)
    assert (s["shards"], s["generated_shards"], s["rows"]) == (4, 4, 15)  # 15 samples, 4 per shard

    # a readable Parquet dataset with pyarrow's own reader (markers and _tmp are ignored)
    table = pds.dataset(str(tmp_path / "runs" / "r1" / "samples"), format="parquet").to_table()
    assert table.schema.equals(SAMPLES_SCHEMA)
    _check_rows(table)
    assert sorted(os.listdir(tmp_path / "runs" / "r1" / "samples" / "_markers")) == [
        f"shard-{i:06d}.json" for i in range(4)]

    # the same run again: nothing regenerated, nothing duplicated
    again = _generate(cfg)
    assert again["generated_shards"] == 0
    _check_rows(RunLayout(str(tmp_path / "runs"), "r1").samples.read())

    # any single sample regenerated alone is byte-identical to the stored PNG
    row = table.filter(pds.field("sample_index") == 3).slice(1, 1).to_pylist()[0]
    model = load_model(tiny_models["pixel_text"])
    sampler = Sampler(model, SamplingConfig(num_inference_steps=3, guidance_scale=cfg.sampling.guidance_scale,
                                             batch_size=row["batch_size"]))
    alone = sampler.generate([row["prompt_id"]], [row["prompt"]], [row["seed"]])[0]
    assert encode_png(alone, cfg.sampling.png_compress_level) == row["image"]


def test_other_settings_in_the_same_run_are_refused(tiny_models, prompt_file, tmp_path):
    # the run's identity, not Ray: resources.executor=local (no actor pool to start)
    _generate(compose(_overrides(tiny_models, prompt_file, tmp_path, "run.name=r", "sampling.samples_per_prompt=1",
                                 "resources.executor=local")))
    from memex.layout import StorageError
    with pytest.raises(StorageError, match="samples_per_prompt"):
        _generate(compose(_overrides(tiny_models, prompt_file, tmp_path, "run.name=r",
                                     "sampling.samples_per_prompt=2", "resources.executor=local")))
    assert RunLayout(str(tmp_path), "r").samples.read().num_rows == len(PROMPTS)


def test_pngs_encoded_beside_the_next_batch_are_the_ones_encoded_in_turn(tiny_models, prompt_file, tmp_path,
                                                                          monkeypatch):
    """A batch's PNGs are encoded on a thread while the next batch samples (GenerateShards): rows,
    bytes and order are those of encoding each batch in turn. Shards of 8 samples, batches of 4: the
    thread always has a batch in flight when the next one starts."""
    tables = {}
    for threads in (0, 1):
        monkeypatch.setattr(generate.GenerateShards, "encode_threads", threads)
        cfg = compose(_overrides(tiny_models, prompt_file, tmp_path / f"t{threads}", "sampling.shard_size=8",
                                 "resources.executor=local"))
        _generate(cfg)
        tables[threads] = RunLayout(str(tmp_path / f"t{threads}"), generate.prepare(cfg)).samples.read()
    _check_rows(tables[1])
    assert tables[1].equals(tables[0])


def test_run_to_moto_s3(ray_head, tiny_models, prompt_file, s3_server, bucket):
    url = s3_server["client_kwargs"]["endpoint_url"]
    cfg = compose(_overrides(tiny_models, prompt_file, f"s3://{bucket}/runs", "storage=s3", "run.name=r1",
                             f"storage.root=s3://{bucket}/runs", "+storage.options.key=testing",
                             "+storage.options.secret=testing", f"storage.options.client_kwargs.endpoint_url={url}"))
    s = _generate(cfg)
    assert s["run"] == f"s3://{bucket}/runs/r1"
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    assert fs.exists(f"{bucket}/runs/r1/samples/_SUCCESS.json")
    table = pds.dataset(f"{bucket}/runs/r1/samples", filesystem=fs, format="parquet").to_table()
    _check_rows(table)


def test_bad_input_fails_before_work(ray_head, tiny_models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    from memex.models import ModelError
    from memex.prompts import PromptError

    with pytest.raises(ModelError, match="model_index.json"):
        _generate(compose(_overrides({"pixel_text": str(tmp_path)}, empty, tmp_path / "runs")))
    with pytest.raises(PromptError, match="holds no prompts"):
        _generate(compose(_overrides(tiny_models, empty, tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()  # nothing was written


@pytest.mark.parametrize("scale, recorded", [(0.5, 1.0), (1.0, 1.0), (2.5, 2.5)])
def test_samples_record_the_guidance_they_were_made_at(tiny_models, prompt_file, tmp_path, scale, recorded):
    """A scale up to 1 samples the text prediction alone (no unconditional pass): the rows say 1.0, the
    scale their pixels were made at, not the configured 0.5 that a reader would take for weaker guidance."""
    cfg = compose(_overrides(tiny_models, prompt_file, tmp_path, f"sampling.guidance_scale={scale}",
                             "sampling.samples_per_prompt=1", "resources.executor=local"))
    _generate(cfg)
    table = RunLayout(str(tmp_path), generate.prepare(cfg)).samples.read()
    assert set(table["guidance_scale"].to_pylist()) == {recorded}
