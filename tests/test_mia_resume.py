"""`memex mia` (memex/stages/mia.py): a resume's check of the shadows trained before, in one pass over shadows/;
the by-copies table of a plain manifest with duplicate rows; an image named as another image's copy in LiRA's
shadow data. tests/test_mia_review.py and tests/test_mia_stage.py hold the rest of the stage's."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex.config import ConfigError
from memex.layout import MIA_IMAGES_SCHEMA, MIA_SCORES_SCHEMA, MIA_SHADOW_SCHEMA, MiaLayout
from memex.stages import mia


# ---- 1. check_trained_shadows --------------------------------------------------------------
def _old_check():
    """check_trained_shadows as it was (each shadow scanned every row of shadows/): the reference verdicts, the
    copy bench/bench_mia_resume.py keeps as its "old" side."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_mia_resume.py"
    spec = importlib.util.spec_from_file_location("bench_mia_resume", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.old_check_trained_shadows


class Shadows:
    """What check_trained_shadows reads of layout.shadows: the complete shadows, their rows, their markers."""

    def __init__(self, table: pa.Table, had: dict[int, int], done=None):
        self.table, self.had, self.path = table, had, "shadows"
        self.done = sorted(set(table["shadow"].to_pylist())) if done is None else done
        self.store = NS(uri_of=lambda p: f"/runs/r/mia/{p}")

    def complete(self):
        return list(self.done)

    def read(self, columns=None):
        return self.table.select(columns) if columns else self.table

    def read_marker(self, s):
        return {"training_steps": self.had[s]} if s in self.had else None


def trained(n_shadows: int, n_images: int, seed: int = 0):
    """shadows/ rows of n_shadows shadows over n_images (rows interleaved, as files read in another order), the
    steps each trained and each one's half."""
    rng = np.random.default_rng(seed)
    ids = [f"img{j:05d}" for j in range(n_images)]
    split = rng.random((n_shadows, n_images)) < 0.5
    shadow = np.tile(np.arange(n_shadows), n_images)  # shadow 0, 1, ... of image 0, then of image 1 ...
    image = np.repeat(np.arange(n_images), n_shadows)
    table = pa.table({"shadow": pa.array(shadow, pa.int32()), "image_id": [ids[j] for j in image],
                      "in_training": split[shadow, image], "loss": np.zeros(len(shadow), np.float32)},
                     schema=MIA_SHADOW_SCHEMA)
    return table, {s: 100 + s for s in range(n_shadows)}, {s: dict(zip(ids, split[s].tolist()))
                                                           for s in range(n_shadows)}


def verdict(fn, *args):
    try:
        fn(*args)
    except ConfigError as e:
        return str(e)
    return None


def test_the_resume_check_gives_the_verdicts_it_gave():
    table, had, inside = trained(5, 40)
    flip = {s: dict(h) for s, h in inside.items()}
    for i in ("img00003", "img00007", "img00030"):
        flip[3][i] = not flip[3][i]
    cases = [
        (Shadows(table, had), dict(had), inside),  # the same plan: no verdict
        (Shadows(table, had), {**had, 2: 7}, inside),  # shadow 2's steps differ
        (Shadows(table, had), dict(had), flip),  # shadow 3 trained on another half (3 ids, the first in file order)
        (Shadows(table, had), {**had, 4: 1}, flip),  # both: shadow 3's half is named first
        (Shadows(table, had), dict(had), None),  # no halves: steps only
        (Shadows(table, had), dict(had), {}),
        (Shadows(table, had), dict(had), {3: flip[3]}),  # some shadows planned
        (Shadows(table, had), dict(had), {3: {}}),  # a half naming none of the images
        (Shadows(table, had, done=[0, 1, 3, 9]), dict(had), flip),  # a marker with no rows (shadow 9)
        (Shadows(table, {**had, 1: None}), dict(had), inside),  # a marker without its steps
        (Shadows(table.slice(0, 0), had, done=[]), dict(had), flip),  # nothing trained yet
        (Shadows(table.filter(pa.compute.not_equal(table["shadow"], 3)), had), dict(had), flip),
    ]
    old_check = _old_check()
    got = [(verdict(mia.check_trained_shadows, *c), verdict(old_check, *c)) for c in cases]
    assert [new for new, _ in got] == [old for _, old in got]
    assert [new is None for new, _ in got] == [True, False, False, False, True, True, False, True, False, False,
                                               True, True]
    assert "3 differ, e.g. img00003" in got[2][0] and "shadow model 2" in got[1][0]


class Shadow(int):
    """A shadow's index that counts how often it is compared with another (a row's shadow, a dict's key)."""

    compared = 0

    def __eq__(self, other):
        Shadow.compared += 1
        return int(self) == other

    def __ne__(self, other):
        return not self == other

    __hash__ = int.__hash__


def test_the_resume_check_looks_up_each_shadows_rows_once():
    """Each complete shadow was compared with every row of shadows/ (S x S x N: 2e8 at 64 shadows of 50,000
    images, ~20 s a resume); its rows are now found once (a few comparisons a shadow, whatever the rows)."""
    n_shadows, n_images = 8, 300
    table, had, inside = trained(n_shadows, n_images)
    done = [Shadow(s) for s in range(n_shadows)]
    Shadow.compared = 0
    mia.check_trained_shadows(Shadows(table, had, done=done), had, inside)
    assert Shadow.compared <= 10 * n_shadows, f"{Shadow.compared} comparisons of a shadow's index for " \
        f"{n_shadows} shadows of {table.num_rows} rows"


# ---- 2. by_copies --------------------------------------------------------------------------
def scores_of(ids, member, copies, seed=0) -> pa.Table:
    n = len(ids)
    loss = np.random.default_rng(seed).random(n)
    return pa.table({"image_id": ids, "member": member, "caption": [None] * n, "copies": pa.array(copies, pa.int32()),
                     "loss": pa.array(loss, pa.float32()), "pia": pa.nulls(n, pa.float32()),
                     "secmi": pa.nulls(n, pa.float32())}, schema=MIA_SCORES_SCHEMA)


def test_by_copies_counts_the_single_copies_of_a_plain_manifest():
    """A plain manifest (no copies column) with two pictures on two rows each: one_row_per_picture gives those 2
    copies and leaves the others unknown; the table read "2" alone, not the 4 members of 1 copy."""
    ids = [f"m{j}" for j in range(8)] + [f"n{j}" for j in range(6)]
    member = [True] * 8 + [False] * 6
    digest = {i: i for i in ids} | {"m1": "m0", "m3": "m2"}
    images = pa.table({"image_id": ids, "member": member, "image": [b""] * 14, "uri": ids, "caption": [None] * 14,
                       "copies": pa.nulls(14, pa.int32())}, schema=MIA_IMAGES_SCHEMA)
    ok = mia.one_row_per_picture(images, digest)
    assert ok["copies"].to_pylist()[:6] == [2, 2, None, None, None, None]  # images.parquet as before
    by = mia.summarize(scores_of(ok["image_id"].to_pylist(), ok["member"].to_pylist(), ok["copies"].to_pylist()),
                       None, ["loss"])["by_copies"]
    assert {c: b["members"] for c, b in by.items()} == {"1": 4, "2": 2}
    # a `memex train` manifest (every member's copies given): as before
    known = scores_of([f"m{j}" for j in range(6)] + ["n0", "n1"], [True] * 6 + [False] * 2,
                      [1, 1, 32, 32, 4, 1, None, None])
    by = mia.summarize(known, None, ["loss"])["by_copies"]
    assert {c: b["members"] for c, b in by.items()} == {"1": 3, "4": 1, "32": 2}
    # no copies known at all (a plain manifest of distinct pictures): no table, as before
    none = scores_of(["m0", "m1", "n0", "n1"], [True, True, False, False], [None] * 4)
    assert mia.summarize(none, None, ["loss"])["by_copies"] == {}


# ---- 3. copy names in the shadow data ------------------------------------------------------
def lira_cfg(root):
    return NS(storage=NS(root=str(root), options={}), resources=NS(),
              mia=NS(shadow_models=2, seed=0, shadow_steps=10, images_per_unit=10, attacks=[]))


RECIPE = {"arch": {"kind": "unconditional"}, "trainer": {"steps": 10, "seed": 0, "batch_size": 1}, "examples": 4}


def images_of(ids, member, copies) -> pa.Table:
    n = len(ids)
    return pa.table({"image_id": ids, "member": member, "image": [b"x"] * n, "uri": ids, "caption": [None] * n,
                     "copies": pa.array(copies, pa.int32())}, schema=MIA_IMAGES_SCHEMA)


class Scored(Exception):
    pass


def test_an_image_named_as_another_images_copy_is_refused_before_scoring(tmp_path, monkeypatch):
    """Member `a` of 2 copies and non-member `a#1`: a shadow's data held two rows `a#1`, and every shadow task
    failed in memex train (ids are not unique) after the target was scored. Refused before the scoring, naming
    the id, its set and the fix; ids without such a clash keep their shadow data's names."""
    def score(*a, **k):
        raise Scored

    monkeypatch.setattr(mia.runner, "run_actor_pool", score)
    images = images_of(["a", "a#1", "b", "c"], [True, False, True, False], [2, None, None, None])
    layout = MiaLayout(str(tmp_path), "r", {})
    with pytest.raises(ConfigError, match=r"image a#1 of nonmembers\.path has the name of copy 1 of image a .*"
                                          r"rename it in nonmembers\.path \(no '#' in an id\)"):
        mia._score_and_measure(lira_cfg(tmp_path), "r", layout, images, RECIPE)
    # a '#' that names no copy (b#1 beside a b of one copy, a#2 beside an a of 2) goes on to the scoring
    fine = images_of(["a", "a#2", "b", "b#1"], [True, None, True, False], [2, None, None, None])
    with pytest.raises(Scored):
        mia._score_and_measure(lira_cfg(tmp_path), "r", layout, fine, RECIPE)

    # the shadow data of ids with no '#': named as before (<id>, <id>#1, ...)
    plain = images_of(["a", "b", "c"], [True, True, False], [3, None, None])
    layout.store.write_table(layout.images_path, plain)
    monkeypatch.setattr(mia, "shadow_trainer", score)  # called once the shadow's data is written
    with pytest.raises(Scored):
        mia.train_and_score_shadow(0, lira_cfg(tmp_path), "r", RECIPE, [True, True, False], 10)
    assert pq.read_table(layout.store.uri_of(layout.shadow_data(0)))["id"].to_pylist() == ["a", "a#1", "a#2", "b"]
