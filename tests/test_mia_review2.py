"""`memex mia` (memex/stages/mia.py), a second review: a LiRA shadow whose half holds no image, image folders
whose file names repeat across the sets, a questioned copy of a member in the shadows' training data, and
transparent images read as the trainer read them. tests/test_mia_stage.py holds the rest of the stage's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex import synth
from memex.config import ConfigError
from memex.images import encode_png
from memex.mia import shadow_splits
from memex.stages import mia

from conftest import compose, logo_set, tiny_uncond

N, SIZE = 6, 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny 8 px model trained a few steps (its scores need not separate anything)."""
    root = tmp_path_factory.mktemp("mia-review2")
    members = logo_set(root / "members.parquet", range(N))
    nonmembers = logo_set(root / "heldout.parquet", range(N, 2 * N))
    model = tiny_uncond(members, root / "model")
    return root, model, members, nonmembers


def cfg_of(world, *extra, members=None, nonmembers=None):
    root, model, m, n = world
    return compose(["model=local", f"model.path={model}", f"members.path={members or m}",
                    f"nonmembers.path={nonmembers or n}", f"storage.root={root / 'runs'}", "mia.images_per_unit=4",
                    "mia.batch_size=4", "resources.executor=local", "mia.attacks=[loss]", "mia.draws=1", *extra],
                   config_name="mia")


def test_a_lira_shadow_whose_half_holds_no_image_is_refused_before_the_folder_is_claimed(world, monkeypatch):
    """3 pictures, 2 shadows, mia.seed=1: every picture falls in shadow 1 and shadow 0's training data is empty.
    memex train failed on it ("holds no rows") after the folder was claimed and the target scored, and the fix
    (another mia.seed) was then refused as other settings of that folder. Refused now at the splits, before the
    folder, naming the fixes."""
    root = world[0]
    members, nonmembers = logo_set(root / "two.parquet", range(2)), logo_set(root / "one.parquet", [2])
    assert not shadow_splits(["logo-00", "logo-01", "logo-02"], 2, 1)[0].any()  # shadow 0: no picture

    def scored(*a, **k):
        raise AssertionError("the target was scored")

    monkeypatch.setattr(mia.runner, "run_actor_pool", scored)
    with pytest.raises(ConfigError, match=r"shadow model 0 of 2 would train on none of the 3 pictures .*mia\.seed=1.*"
                                          r"give more images, another mia\.seed, or fewer mia\.shadow_models"):
        mia.run(cfg_of(world, "run.name=empty-half", "mia=lira", "mia.shadow_models=2", "mia.seed=1",
                       members=members, nonmembers=nonmembers))
    assert not (root / "runs" / "empty-half").exists()  # nothing claimed: another mia.seed runs in this name
    assert shadow_splits(["logo-00", "logo-01", "logo-02"], 2, 0).any(1).all()  # seed 0: both halves hold one
    mia.check_halves(shadow_splits(["logo-00", "logo-01", "logo-02"], 2, 0), 3, 0)


def write_folder(path: Path, indices) -> Path:
    path.mkdir(parents=True)
    for k, i in enumerate(indices):  # a camera's numbering: the names say nothing of the pictures
        (path / f"{k:04d}.png").write_bytes(encode_png(synth.logo(i, SIZE, 0)[0]))
    return path


def test_image_folders_that_name_files_alike_are_scored_and_a_picture_in_both_is_refused(world, tmp_path):
    """members/ and nonmembers/ both holding 0000.png, 0001.png, ... (distinct pictures) were refused as sharing
    4 ids. Their ids are read as members/0000.png and nonmembers/0000.png now; a picture in both folders is
    still refused, named by those ids, and a manifest's shared id too (tests/test_mia_stage.py's same_id)."""
    members, nonmembers = write_folder(tmp_path / "m", range(4)), write_folder(tmp_path / "n", range(10, 14))
    s = mia.run(cfg_of(world, "run.name=folders", members=members, nonmembers=nonmembers))
    assert (s["members"], s["nonmembers"]) == (4, 4)
    ids = pq.read_table(world[0] / "runs" / "folders" / "mia" / "images.parquet")["image_id"].to_pylist()
    assert sorted(ids) == [f"{n}/{k:04d}.png" for n in ("members", "nonmembers") for k in range(4)]
    same = write_folder(tmp_path / "same", [10, 1, 12, 13])  # 0001.png: members' 0001.png
    with pytest.raises(ConfigError, match=r"1 non-member images are the same picture as a member "
                                          r"\(nonmembers/0001\.png = members/0001\.png\)"):
        mia.run(cfg_of(world, "run.name=folders-same", members=members, nonmembers=same))


def test_a_questioned_copy_of_a_member_is_trained_once_by_the_shadows_that_train_the_member(world, monkeypatch):
    """A questioned image with a member's exact pixels takes the member's LiRA split, and each in-shadow's
    training data held the picture twice (the member's row and the query's) where the target trained on it once,
    and planned its steps for both rows. The in-shadow's rows of that picture are the target's now."""
    import memex.training
    from memex.images import decode

    root, model, members, _ = world
    query = logo_set(root / "query.parquet", [1], ids=["my-copy-of-logo-01"])  # logo-01's exact pixels
    target = pq.read_table(Path(model) / "training_manifest.parquet")["source_id"].to_pylist().count("logo-01")
    seed = next(k for k in range(20) if shadow_splits(["logo-01"], 2, k)[0, 0])  # shadow 0 trains logo-01
    data, steps = [], []

    class Stop(Exception):
        pass

    def train(config, **kw):  # shadow 0's training data, then stop
        data.append(pq.read_table(config.data.path))
        steps.append(config.trainer.steps)
        raise Stop

    monkeypatch.setattr(memex.training, "train", train)
    with pytest.raises(Stop):
        mia.run(cfg_of(world, "run.name=query-copy", "mia=lira", "mia.shadow_models=2", f"mia.seed={seed}",
                       f"queries.path={query}"))
    picture = decode(pq.read_table(members).to_pylist()[1]["image"])
    rows = [r["id"] for r in data[0].to_pylist() if np.array_equal(decode(r["image"]), picture)]
    assert target == 1 and rows == ["logo-01"]
    # its steps: as many passes over the half's rows as the target made over its own, the query not counted
    recipe = mia.shadow_recipe(str(model))
    assert steps == [mia.shadow_steps(recipe, data[0].num_rows, None)]


def test_mia_alpha_drop_scores_transparent_images_as_a_trainer_that_drops_alpha_saw_them(world, tiny_models, tmp_path,
                                                                                        monkeypatch):
    """A transparent logo on a black hidden background, trained by a script that does image.convert("RGB")
    (diffusers' train_text_to_image), was scored composited onto white: pixels that model never saw, and no
    setting read it otherwise (the audit has trainset.alpha=drop). mia.alpha=drop reads it as that trainer did;
    unset, it is composited onto white and left out of the folder's settings (folders written before resume);
    on a `memex train` model, which composites onto white, drop is refused."""
    import io

    from PIL import Image

    from memex.mia import MiaScorer

    yy, xx = np.mgrid[0:16, 0:16]
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[(yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 30] = (220, 30, 30, 255)  # a red disc, black under alpha 0
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    trained = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))  # what the trainer saw
    pq.write_table(pa.table({"id": ["logo"], "image": [buf.getvalue()]}), tmp_path / "m.parquet")
    nonmembers = logo_set(tmp_path / "n.parquet", [20, 21])
    seen = {}
    real = MiaScorer.score

    def score(self, ids, images, *a, **k):
        seen.update(zip(ids, images))
        return real(self, ids, images, *a, **k)

    monkeypatch.setattr(MiaScorer, "score", score)
    for name, extra in (("drop", ["mia.alpha=drop"]), ("white", [])):
        seen.clear()
        s = mia.run(compose(["model=local", f"model.path={tiny_models['unconditional']}",
                             f"members.path={tmp_path / 'm.parquet'}", f"nonmembers.path={nonmembers}",
                             f"storage.root={tmp_path / 'runs'}", f"run.name={name}", "resources.executor=local",
                             "mia.attacks=[loss]", "mia.draws=1", *extra], config_name="mia"))
        if name == "drop":
            assert np.array_equal(seen["logo"], trained) and s["settings"]["mia"]["alpha"] == "drop"
        else:  # onto white: the disc's surroundings 255, 167 grey levels a pixel from what the trainer saw
            assert (seen["logo"][0, 0] == 255).all() and np.abs(seen["logo"].astype(int) - trained).mean() > 100
            assert "alpha" not in s["settings"]["mia"]
    with pytest.raises(ConfigError, match=r"mia\.alpha=drop .* was trained by `memex train`, which composites them "
                                          r"onto white: leave mia\.alpha unset"):
        mia.run(cfg_of(world, "run.name=alpha-memex-train", "mia.alpha=drop"))
