"""`memex mia`'s workers hold only the images they score (memex/stages/mia.py read_image_rows): each scoring
unit reads its own rows of images.parquet, and a LiRA shadow task images_per_unit rows at a time. Each actor
and each shadow task read the whole file, every image's bytes (members and non-members), to score its part:
~5 GB a worker at 50,000 LAION images of 100 KB, times the workers of a node (bench/bench_mia_memory.py).
The scores are those of the whole-set path, bit for bit."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex import synth
from memex.config import ArchConfig, ArchKind, DataConfig, TrainConfig, TrainerConfig
from memex.images import encode_png
from memex.layout import MIA_IMAGES_SCHEMA, MiaLayout
from memex.stages import mia

from conftest import compose

PER = 4  # mia.images_per_unit: 13 images are units of 4, 4, 4 and 1


def write_set(path: Path, indices, ids) -> Path:
    rows = [synth.logo(i, 8, 0) for i in indices]
    pq.write_table(pa.table({"id": ids, "image": [encode_png(r[0]) for r in rows],
                             "caption": [r[1] for r in rows]}), path)
    return path


class Reads:
    """The rows of images.parquet each pyarrow read returns with their bytes (its image column), by the
    worker running: ("score", "init") while an actor is built, ("score", unit), ("shadow", index)."""

    def __init__(self, monkeypatch):
        self.worker, self.ids = None, defaultdict(list)  # worker -> [the image ids of one read]
        read_table = pq.read_table

        def note(source, t: pa.Table) -> pa.Table:
            if self.worker is not None and "images.parquet" in str(source) and "image" in t.column_names:
                self.ids[self.worker].append(t["image_id"].to_pylist())
            return t

        monkeypatch.setattr(pq, "read_table", lambda source, *a, **k: note(source, read_table(source, *a, **k)))
        init = pq.ParquetFile.__init__

        def file_init(f, source, *a, **k):
            f.memex_source = source
            init(f, source, *a, **k)

        monkeypatch.setattr(pq.ParquetFile, "__init__", file_init)
        for name in ("read", "read_row_group", "read_row_groups"):
            real = getattr(pq.ParquetFile, name)
            monkeypatch.setattr(pq.ParquetFile, name, lambda f, *a, _r=real, **k: note(f.memex_source, _r(f, *a, **k)))
        batches = pq.ParquetFile.iter_batches

        def iter_batches(f, *a, **k):
            for b in batches(f, *a, **k):
                note(f.memex_source, pa.Table.from_batches([b]))
                yield b

        monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from memex.training import train

    root = tmp_path_factory.mktemp("mia-memory")
    # logo-00 under 3 ids: one member with 3 copies (rows of its own in a shadow's training data)
    members = write_set(root / "members.parquet", [0, 1, 2, 3, 4, 5, 0, 0],
                        [f"logo-{i:02d}" for i in range(6)] + ["logo-00-a", "logo-00-b"])
    nonmembers = write_set(root / "heldout.parquet", range(6, 13), [f"logo-{i:02d}" for i in range(6, 13)])
    model = train(TrainConfig(arch=ArchConfig(kind=ArchKind.unconditional, resolution=8, block_out_channels=[8, 16],
                                              attention_levels=0), data=DataConfig(path=str(members)),
                              trainer=TrainerConfig(steps=20, batch_size=8, lr=5e-3, warmup_steps=2,
                                                    checkpoint_every=20, log_every=20), output=str(root / "model")))
    return root, model, members, nonmembers


def test_each_unit_and_shadow_task_loads_only_its_own_rows_and_scores_as_the_whole_set(world, monkeypatch):
    from memex.mia import MiaScorer
    from memex.models import load_model

    root, model, members, nonmembers = world
    cfg = compose(["model=local", f"model.path={model}", f"members.path={members}", f"nonmembers.path={nonmembers}",
                   f"storage.root={root / 'runs'}", f"mia.images_per_unit={PER}", "mia.batch_size=4", "mia=lira",
                   "mia.shadow_models=2", "mia.shadow_steps=5", "mia.attacks=[loss,pia]", "run.name=m",
                   "resources.executor=local"], config_name="mia")
    reads = Reads(monkeypatch)

    class Actor(mia.ScoreImages):
        def __init__(self, *a, **k):
            reads.worker = ("score", "init")
            super().__init__(*a, **k)
            reads.worker = None

        def __call__(self, index: int, start: int, stop: int):
            reads.worker, units[index] = ("score", index), (start, stop)
            try:
                return super().__call__(index, start, stop)
            finally:
                reads.worker = None

    def shadow(index: int, **kw):
        reads.worker = ("shadow", index)
        try:
            return real_shadow(index, **kw)
        finally:
            reads.worker = None

    units, real_shadow = {}, mia.train_and_score_shadow
    monkeypatch.setattr(mia, "ScoreImages", Actor)
    monkeypatch.setattr(mia, "train_and_score_shadow", shadow)
    mia.run(cfg)
    monkeypatch.undo()

    layout = MiaLayout(cfg.storage.root, "m")
    whole = pq.read_table(layout.store.uri_of(layout.images_path), schema=MIA_IMAGES_SCHEMA)
    ids = whole["image_id"].to_pylist()
    assert len(ids) == 13 and sorted(units) == [0, 1, 2, 3]
    # building an actor loads no image; a unit loads its own rows, once (the actor held all 13 from its start)
    assert reads.ids[("score", "init")] == []
    for i, (start, stop) in units.items():
        assert reads.ids[("score", i)] == [ids[start:stop]], i
    for s in range(2):  # a shadow task: images_per_unit rows a read (it held all 13 throughout), every image read
        got = reads.ids[("shadow", s)]
        assert got and max(map(len, got)) <= PER, (s, got)
        assert sorted({i for r in got for i in r}) == sorted(ids)

    # the whole-set path: every image's bytes in one table, sliced a unit at a time, gives the same numbers
    opts, attacks = cfg.storage.options, [a.value for a in cfg.mia.attacks]
    scorer = MiaScorer(load_model(str(model), device="cpu"), cfg.mia)
    target = pa.concat_tables([mia.score_rows(scorer, whole.slice(a, PER), attacks, opts)[0]
                               for a in range(0, len(ids), PER)])
    assert layout.scores.read().sort_by("image_id").equals(target.sort_by("image_id"))
    shadows = layout.shadows.read()
    for s in range(2):
        rows = shadows.filter(pa.compute.equal(shadows["shadow"], s))
        assert rows["image_id"].to_pylist() == ids
        scorer = MiaScorer(load_model(layout.store.uri_of(layout.shadow_model(s)), device="cpu"), cfg.mia)
        loss = pa.concat_tables([mia.score_rows(scorer, whole.slice(a, PER), ["loss"], opts)[0]
                                 for a in range(0, len(ids), PER)])["loss"]
        assert rows["loss"].equals(loss)
        # its training data as built from the whole table: its half, a picture's copies as rows of their own
        half = whole.filter(rows["in_training"]).to_pylist()
        want = [(r["image_id"] + (f"#{k}" if k else ""), r["image"]) for r in half
                for k in range(max(1, r["copies"] or 1))]
        data = pq.read_table(layout.store.uri_of(layout.shadow_data(s)))
        assert list(zip(data["id"].to_pylist(), data["image"].to_pylist())) == want
        assert layout.shadows.read_marker(s)["examples"] == len(want)
    assert any("#" in i for s in range(2) for i in pq.read_table(
        layout.store.uri_of(layout.shadow_data(s)))["id"].to_pylist())  # the 3-copy member's extra rows


def test_rows_are_read_by_range_from_any_row_groups_and_an_older_file_is_regrouped(tmp_path):
    """read_image_rows gives rows [start, stop) whatever the file's row groups (a file of before: one group);
    regroup_images writes an older folder's images.parquet again a unit a row group, the same rows."""
    layout = MiaLayout(str(tmp_path), "r")
    images = pa.table({"image_id": [f"i{k:02d}" for k in range(11)], "member": [k % 2 == 0 for k in range(11)],
                       "image": [bytes([k]) * (k + 1) for k in range(11)], "uri": [None] * 11,
                       "caption": [f"c{k}" for k in range(11)], "copies": [None] * 11}, schema=MIA_IMAGES_SCHEMA)
    for groups in (None, 3, 4, 5):
        layout.store.write_table(layout.images_path, images, row_group_size=groups)
        for start, stop in ((0, 4), (4, 8), (8, 12), (3, 9), (10, 11), (11, 15)):
            assert mia.read_image_rows(layout.store, layout.images_path, start, stop).equals(
                images.slice(start, stop - start)), (groups, start, stop)
    layout.store.write_table(layout.images_path, images)  # one row group, as memex wrote it before
    mia.regroup_images(layout, 4)
    md = pq.read_metadata(layout.store.uri_of(layout.images_path))
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [4, 4, 3]
    assert pq.read_table(layout.store.uri_of(layout.images_path)).equals(images)
    mtime = Path(layout.store.uri_of(layout.images_path)).stat().st_mtime_ns
    mia.regroup_images(layout, 4)  # already a unit a group: left as it is
    assert Path(layout.store.uri_of(layout.images_path)).stat().st_mtime_ns == mtime
