"""`memex mia` (memex/stages/mia.py): the questioned images' p-values past 20,000 non-members, LiRA's shadows of a
target trained with a large seed, a held-out picture that is a member as the model sees it, near-copy chains
across the questioned images, and a diverged shadow. tests/test_mia_stage.py holds the rest of the stage's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from memex import synth
from memex.config import ConfigError
from memex.images import encode_png
from memex.layout import MIA_IMAGES_SCHEMA, MiaLayout
from memex.models import ModelError
from memex.stages import mia

from conftest import compose, logo_set, tiny_uncond

N, SIZE = 6, 8
SEED = 1_700_000_000_000  # a millisecond timestamp: memex train takes it as trainer.seed


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny 8 px model trained a few steps with a timestamp seed (its scores need not separate anything)."""
    root = tmp_path_factory.mktemp("mia-review")
    members = logo_set(root / "members.parquet", range(N))
    nonmembers = logo_set(root / "heldout.parquet", range(N, 2 * N))
    model = tiny_uncond(members, root / "model", seed=SEED)
    return root, model, members, nonmembers


def cfg_of(world, *extra):
    root, model, members, nonmembers = world
    return compose(["model=local", f"model.path={model}", f"members.path={members}", f"nonmembers.path={nonmembers}",
                    f"storage.root={root / 'runs'}", "mia.images_per_unit=4", "mia.batch_size=4",
                    "resources.executor=local", "mia.attacks=[loss]", *extra], config_name="mia")


def images_table(rows) -> pa.Table:
    return pa.table({"image_id": [r[0] for r in rows], "member": pa.array([r[2] for r in rows], pa.bool_()),
                     "image": [encode_png(r[1]) for r in rows], "uri": [None] * len(rows),
                     "caption": [None] * len(rows), "copies": pa.nulls(len(rows), pa.int32())},
                    schema=MIA_IMAGES_SCHEMA)


def test_a_query_p_value_past_20000_non_members_keeps_its_digits_in_the_summary_console_and_report():
    """A query above all 30,000 non-members has p = 1/30,001 = 3.33e-05 (docs/method.md: at least 1/(n0+1)).
    summary.json kept 4 decimals (0.0), the console and the report printed 3 (0.000): "no chance at all".
    Stored to 4 significant figures now, printed never as 0 for a positive value (0.500 still reads 0.500)."""
    from memex.mia_report import _queries

    n1, n0 = 20, 30_000
    rng = np.random.default_rng(0)
    ids = [f"m{i}" for i in range(n1)] + [f"n{i}" for i in range(n0)] + ["q-top", "q-mid"]
    loss = np.r_[rng.normal(1, 0.1, n1 + n0), [-5.0, 1.0]].astype(np.float32)
    scores = pa.table({"image_id": ids, "member": pa.array([True] * n1 + [False] * n0 + [None] * 2, pa.bool_()),
                       "caption": [None] * len(ids), "copies": pa.nulls(len(ids), pa.int32()), "loss": loss})
    out = mia.summarize(scores, None, ["loss"])
    p = {q["image_id"]: q["p_value"]["loss"] for q in out["queries"]}
    q = {r["image_id"]: r["q_value"]["loss"] for r in out["queries"]}
    assert p["q-top"] == pytest.approx(1 / (n0 + 1), rel=1e-3) and q["q-top"] == pytest.approx(2 / (n0 + 1), rel=1e-3)
    assert 0.3 < p["q-mid"] < 0.7
    text = mia.format_summary({**out, "model": "m", "members": n1, "nonmembers": n0, "quarantined": 0,
                               "unet_evaluations": 0, "shadow_models": 0, "run": "r"})
    assert "query q-top: p-value loss 3.33e-05" in text and "q-value loss 6.67e-05" in text, text
    assert re.search(r"query q-mid: p-value loss 0\.\d\d\d ", text), text  # 3 decimals, as before
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", _queries(out["queries"]))
    assert cells[:3] == ["q-top", "3.33e-05", "6.67e-05"] and "0.000" not in cells, cells


@pytest.mark.slow
def test_a_target_trained_with_a_timestamp_seed_trains_its_shadows(world):
    """The shadows were seeded target_seed x 1000 + index + 1: 1.7e15 for a target trained with a millisecond
    timestamp, past what memex train takes, and every shadow task failed with a ConfigError after the target
    was scored. Such a seed is derived in range now (a hash of the seed and the shadow); a seed in range keeps
    the formula, so the shadows of folders trained before keep theirs. The seeds are checked before scoring."""
    from memex.training import seed_range

    s = mia.run(cfg_of(world, "run.name=big-seed", "mia=lira", "mia.shadow_models=2", "mia.shadow_steps=5"))
    assert set(s["attacks"]) == {"loss", "lira_online", "lira_offline"} and s["shadow_training_steps"] == [5, 5]
    layout = MiaLayout(str(world[0] / "runs"), "big-seed")
    lo, hi = seed_range(5)
    seeds = [json.loads(Path(layout.store.uri_of(layout.shadow_model(k)), "memex_train.json").read_text())["seed"]
             for k in range(2)]
    assert seeds == [mia.shadow_seed(SEED, k, 5) for k in range(2)] and all(lo <= x <= hi for x in seeds)
    assert len({mia.shadow_seed(SEED, k, 5) for k in range(16)}) == 16  # a seed of its own each
    assert mia.shadow_seed(0, 0, 300) == 1 and mia.shadow_seed(7, 3, 300) == 7004  # in range: as before

    # a shadow seed memex train would refuse is named before the target is scored
    def scored(*a, **k):
        raise AssertionError("the target was scored")

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(mia, "shadow_seed", lambda seed, index, steps: 2**70)
        mp.setattr(mia.runner, "run_actor_pool", scored)
        with pytest.raises(ConfigError, match=r"shadow model 0 would train with trainer\.seed=\d+, outside "):
            mia.run(cfg_of(world, "run.name=bad-seed", "mia=lira", "mia.shadow_models=2", "mia.shadow_steps=5"))
    finally:
        mp.undo()


def test_a_held_out_centre_square_of_a_wide_member_is_a_near_copy_as_the_model_sees_it():
    """Under center_crop a wide member's centre square, held out under its own id, is the very input the model
    trained on; the set checks compared squashed thumbnails of the stored images (0.28 RMS apart), so it was
    scored as a non-member. It is quarantined now, named with its member and the view; under resize (what a
    memex train model sees) the two are different inputs and both are kept."""
    from memex.mia import to_model_images

    wide = np.concatenate([synth.logo(i, 64, 0)[0] for i in (1, 2, 3)], axis=1)[:, 32:160]  # 64 x 128
    square = wide[:, 32:96].copy()
    rows = [("member-wide", wide, True), ("nonmember-crop", square, False),
            ("nonmember-a", synth.logo(10, 64, 0)[0], False), ("nonmember-b", synth.logo(11, 64, 0)[0], False)]
    x = to_model_images([wide, square], 32, 3, "center_crop")
    assert bool((x[0] == x[1]).all())  # one input to the model
    for kw in ({}, {"preprocess": "center_crop"}):  # none given: the centre crop, as MiaScorer's default
        ok, quarantine, _, _ = mia.check_sets(images_table(rows), {}, **kw)
        assert sorted(ok["image_id"].to_pylist()) == ["member-wide", "nonmember-a", "nonmember-b"]
        why = dict(zip(quarantine["id"].to_pylist(), quarantine["reason"].to_pylist()))
        assert list(why) == ["nonmember-crop"]
        assert why["nonmember-crop"].startswith("a near copy of member member-wide (RMS 0.0")
        assert "of the model's input (mia.preprocess=center_crop)" in why["nonmember-crop"]
    ok, quarantine, _, _ = mia.check_sets(images_table(rows), {}, preprocess="resize")
    assert ok.num_rows == 4 and quarantine.num_rows == 0


def test_near_copy_chains_across_the_questioned_images_take_one_shadow_split():
    """q1 a near copy of a member, q2 of q1 but not of the member: q2 got a split of its own (the queries were
    grouped only when neither matched a labelled image), so out-shadows of the member and q1 trained on q2, a
    near-identical picture; a query holding another query's picture under its own id took that query's split,
    not the member's q1 took. One group now, with the member's split; a picture apart keeps its own."""
    m = np.clip(synth.logo(3, 32, 0)[0].astype(int), 20, 230)
    shift = lambda k: np.clip(m + k, 0, 255).astype(np.uint8)  # noqa: E731
    rows = [("member", shift(0), True), ("nonmember", synth.logo(40, 32, 0)[0], False),
            ("q1", shift(4), None), ("q2", shift(8), None), ("q3", shift(12), None), ("q1-again", shift(4), None),
            ("q-other", synth.logo(41, 32, 0)[0], None)]
    th = {r[0]: mia.thumb(r[1]) for r in rows}
    rms = lambda a, b: float(np.sqrt(((th[a] - th[b]) ** 2).mean()))  # noqa: E731
    assert rms("member", "q1") <= mia.NEAR_COPY_RMS < rms("member", "q2")  # a chain, no shortcut
    ok, _, split_as, _ = mia.check_sets(images_table(rows), {})
    assert split_as == {"q1": "member", "q2": "member", "q3": "member", "q1-again": "member"}
    ids = ok["image_id"].to_pylist()
    split = mia.splits_of(ids, split_as, 16, 0)
    col = {i: k for k, i in enumerate(ids)}
    for q in ("q1", "q2", "q3", "q1-again"):
        assert (split[:, col[q]] == split[:, col["member"]]).all(), q
    assert not (split[:, col["q-other"]] == split[:, col["member"]]).all()


def test_a_diverged_shadow_is_named_with_the_entries_to_delete(world, monkeypatch):
    """A shadow whose losses are not finite (diverged in training: NaN weights) failed LiRA with a bare
    ValueError "losses must be finite" after every shadow had trained, naming none; its marker stayed, so a
    rerun failed the same way. A ModelError now names the shadow and its shadows/ and shadow_models/ entries;
    deleting them and rerunning trains that shadow alone again."""
    from memex.layout import MIA_SHADOW_SCHEMA

    trained = []

    def shadow(index, cfg, run_name, recipe, inside, steps, diverged=(1,)):
        trained.append(index)
        layout = MiaLayout(cfg.storage.root, run_name, cfg.storage.options)
        ids = layout.store.read_table(layout.images_path, columns=["image_id"])["image_id"].to_pylist()
        Path(layout.store.uri_of(layout.shadow_model(index))).mkdir(parents=True)
        loss = np.full(len(ids), np.nan if index in diverged else 0.5) + np.linspace(0, 0.1, len(ids))
        return pa.table({"shadow": pa.array([index] * len(ids), pa.int32()), "image_id": ids,
                         "in_training": pa.array(inside), "loss": pa.array(loss, pa.float32())},
                        schema=MIA_SHADOW_SCHEMA), {"training_steps": steps, "unet_evaluations": 0}

    monkeypatch.setattr(mia, "train_and_score_shadow", shadow)
    cfg = cfg_of(world, "run.name=diverged-shadow", "mia=lira", "mia.shadow_models=4", "mia.shadow_steps=5")
    with pytest.raises(ModelError, match=r"LiRA: shadow model 1 of 4 gave non-finite losses \(shadow 1: 12 of 12 "
                                         r"images, e\.g\. logo-00.*\): the shadow diverged") as e:
        mia.run(cfg)
    layout = MiaLayout(str(world[0] / "runs"), "diverged-shadow")
    named = [layout.store.uri_of(p) for p in (layout.shadows.marker(1), layout.shadows.file(1),
                                              layout.shadow_model(1))]
    assert all(p in str(e.value) for p in named) and "shadow-000000" not in str(e.value)
    assert sorted(trained) == [0, 1, 2, 3]
    for p in named:  # as the message says
        shutil.rmtree(p) if Path(p).is_dir() else Path(p).unlink()
    monkeypatch.setattr(mia, "train_and_score_shadow", lambda *a, **k: shadow(*a, **k, diverged=()))
    s = mia.run(cfg)
    assert sorted(trained) == [0, 1, 1, 2, 3] and {"lira_online", "lira_offline"} <= set(s["attacks"])
