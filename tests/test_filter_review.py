import numpy as np
import pyarrow as pa

from conftest import blocky, compose, plant_run


def test_a_filter_unit_reads_only_its_own_prompts(tmp_path, monkeypatch):
    """Every filter unit read the whole prompts.parquet to take its filter.prompts_per_task rows (one row group:
    at the paper's 350,000 prompts, 21,875 units x ~6 MiB = 128 GiB read). The stage reads it once and hands
    each unit its rows; the candidates are those the units found reading the file themselves."""
    from memex.stages import filter as filter_stage

    rng = np.random.default_rng(3)
    copy = blocky(rng, 16)
    # 5 prompts, 2 a unit: 3 units, the last one short; prompts 1 and 3 collapse onto one image
    samples = {f"prompt {p}": [copy.copy() if p in (1, 3) else blocky(rng, 16) for _ in range(4)] for p in range(5)}
    layout = plant_run(tmp_path, "r", samples, shard_size=4)
    cfg = compose([f"storage.root={tmp_path}", "model.path=/planted", "run.name=r", "sampling.samples_per_prompt=4",
                   "filter.min_clique=2", "filter.prompts_per_task=2", "resources.executor=local"],
                  config_name="audit")

    read = filter_stage.read_run_prompts
    rows_read = []

    def counted(lay):
        t = read(lay)
        rows_read.append(t.num_rows)
        return t

    monkeypatch.setattr(filter_stage, "read_run_prompts", counted)
    summary = filter_stage.run(cfg, "r")
    assert rows_read == [5]  # the stage's one read; none by its 3 units (it was [5, 5, 5, 5])
    assert summary["prompts"] == 5 and summary["flagged"] == 2

    got = layout.candidates.read()
    # the same rows as units that read prompts.parquet themselves (the old way: no prompts handed over)
    want = pa.concat_tables([filter_stage.filter_chunk(c, layout, p0, min(p0 + 2, 5), cfg.filter, "cpu")
                             for c, p0 in enumerate(range(0, 5, 2))])
    assert len(rows_read) == 4  # those 3 calls did read the file
    assert got.to_pylist() == want.to_pylist()
    assert got["prompt"].to_pylist() == list(samples)
    assert [r["prompt"] for r in got.to_pylist() if r["flagged"]] == ["prompt 1", "prompt 3"]
