"""`memex mia` end to end (memex/stages/mia.py): a tiny unconditional model trained with `memex train`
on 6 logos until it memorizes them, 6 held-out logos of the same generator as non-members, every
attack scored on Ray, LiRA with 2 shadow models trained as Ray tasks; and the inputs it refuses
before any work. The attacks' math is tests/test_mia.py's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memex import synth
from memex.config import ConfigError, MemexError
from memex.layout import MiaLayout
from memex.stages import mia

from conftest import compose, logo_set, tiny_uncond

N, SIZE, STEPS = 6, 8, 300  # 300 Adam steps: the model memorizes its 6 logos


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mia")
    members = logo_set(root / "members.parquet", range(N))
    nonmembers = logo_set(root / "heldout.parquet", range(N, 2 * N))
    t = pq.read_table(nonmembers)  # + one corrupt image: quarantined, the rest scored
    pq.write_table(pa.concat_tables([t, pa.table({"id": ["broken"], "image": [b"\x89PNG\r\n\x1a\n cut"],
                                                  "caption": ["a broken logo"]}, schema=t.schema)]), nonmembers)
    model = tiny_uncond(members, root / "model", steps=STEPS, warmup=10)
    return root, model, members, nonmembers


def cfg_of(world, *extra):
    root, model, members, nonmembers = world
    return compose(["model=local", f"model.path={model}", f"members.path={members}", f"nonmembers.path={nonmembers}",
                    f"storage.root={root / 'runs'}", "mia.images_per_unit=4", "mia.batch_size=4", *extra],
                   config_name="mia")


@pytest.mark.slow
def test_members_of_a_memorizing_model_are_told_apart_and_lira_trains_its_shadows(world, monkeypatch):
    cfg = cfg_of(world, "mia=lira", "mia.shadow_models=2", "run.name=m",
                 "resources.executor=local")  # the attacks, not Ray: no actor pool or task to start
    scored = []  # rows a call decodes: mia.images_per_unit (4) at most, shadows too (they decoded the whole set)
    real = mia.score_rows
    monkeypatch.setattr(mia, "score_rows",
                        lambda scorer, rows, *a: scored.append(rows.num_rows) or real(scorer, rows, *a))
    import memex.training

    on_cpu = []  # each shadow trains on the device its task was given (accelerate took any GPU it saw)
    checked = []  # and with its target's schedule as trained (no short-schedule refusal for older targets)
    real_train = memex.training.train
    monkeypatch.setattr(memex.training, "train", lambda c, cpu=False, copies_recipe=False: on_cpu.append(cpu) or
                        checked.append(not copies_recipe) or real_train(c, cpu=cpu, copies_recipe=copies_recipe))
    s = mia.run(cfg)
    assert max(scored) == 4 and sum(scored) == 3 * 2 * N  # the target's units and 2 shadows', 2N images each
    # resources.device=auto, not on a Ray worker: the GPU where one is visible (memex/models.py resolve_device)
    assert on_cpu == [not torch.cuda.is_available()] * 2 and checked == [False, False]
    assert (s["members"], s["nonmembers"], s["quarantined"], s["shadow_models"]) == (N, N, 1, 2)
    assert set(s["attacks"]) == {"loss", "pia", "secmi", "lira_online", "lira_offline"}
    assert s["attacks"]["loss"]["auc"] >= 0.9, s["attacks"]  # memorized: loss tells them apart (measured 0.94)
    # LiRA compares each image's loss under the target with 2 shadows, one trained with it, one without
    assert s["attacks"]["lira_online"]["auc"] >= 0.8, s["attacks"]
    # 12 images x (4 draws + 2 PIA + 12 SecMI) on the target + 12 x 4 draws per shadow, padding included
    assert s["unet_evaluations"] == 12 * (4 + 2 + 12) + 2 * 12 * 4

    layout = MiaLayout(cfg.storage.root, "m")
    quarantine = pq.read_table(layout.store.uri_of(layout.quarantine_path)).to_pylist()
    assert [q["id"] for q in quarantine] == ["broken"] and quarantine[0]["reason"]
    scores = layout.scores.read()
    assert scores.num_rows == 2 * N and len(set(scores["image_id"].to_pylist())) == 2 * N
    lira = pq.read_table(layout.store.uri_of(layout.lira_path))
    assert lira["shadows_in"].to_pylist() == [1] * (2 * N)  # each image in exactly half of the 2 shadows
    shadows = layout.shadows.read()
    for k in range(2):  # each shadow was trained on its half, saved as a loadable diffusers folder
        rows = shadows.filter(pa.compute.equal(shadows["shadow"], k))
        inside = sorted(r["image_id"] for r in rows.to_pylist() if r["in_training"])
        data = pq.read_table(layout.store.uri_of(layout.shadow_data(k)))
        assert sorted(data["id"].to_pylist()) == inside and 0 < len(inside) < 2 * N
        assert Path(layout.store.uri_of(layout.shadow_model(k)), "model_index.json").exists()
        # as many passes over its half as the target made over its N images in STEPS steps
        steps = round(STEPS * len(inside) / N)
        assert layout.shadows.read_marker(k)["training_steps"] == steps == s["shadow_training_steps"][k]
    assert Path(s["report"]).exists() and "<svg" in Path(s["report"]).read_text()
    on_disk = json.loads(Path(layout.store.uri_of(layout.summary_path)).read_text())
    assert on_disk["attacks"] == s["attacks"]

    # a rerun redoes nothing and scores the same images the same way
    markers = {i: layout.scores.read_marker(i) for i in layout.scores.complete()}
    again = mia.run(cfg)
    assert again["attacks"] == s["attacks"]
    assert {i: layout.scores.read_marker(i) for i in layout.scores.complete()} == markers
    assert layout.scores.read().sort_by("image_id").equals(scores.sort_by("image_id"))


def test_a_shadow_trains_for_as_many_passes_over_its_half_as_the_target_made(tmp_path):
    """The demo's target: 5,000 steps over 560 rows (its 256 logos with their copies). A shadow
    holding 408 rows takes 3,643 steps, not 5,000 (which gave its images 1.37x the target's passes);
    an explicit mia.shadow_steps is kept. Shadows a run of before trained another way are refused
    on rerun, naming the folder to remove."""
    from memex.storage import StageFolder, Store

    recipe = {"trainer": {"steps": 5000, "batch_size": 32}, "examples": 560}
    assert mia.shadow_steps(recipe, 408, None) == 3643
    assert mia.shadow_steps(recipe, 560, None) == 5000 and mia.shadow_steps(recipe, 1, None) == 9
    assert mia.shadow_steps(recipe, 408, 300) == 300
    with pytest.raises(MemexError, match="set mia.shadow_steps"):
        mia.shadow_steps({"trainer": {"steps": 5000}, "examples": None}, 408, None)

    folder = StageFolder(Store(str(tmp_path)), "shadows")
    folder.mark_complete(0, {"training_steps": 5000})
    mia.check_trained_shadows(folder, {0: 5000, 1: 3643})  # shadow 1 not trained yet: nothing to compare
    with pytest.raises(MemexError, match="shadow model 0 .* trained for 5000 steps and this run trains it for 3643"
                                          r".*remove .*shadows to train"):
        mia.check_trained_shadows(folder, {0: 3643, 1: 3643})

    # trained on another half than this run plans (before a questioned copy of a member took the member's split)
    from memex.layout import MIA_SHADOW_SCHEMA

    folder.write_shard(0, pa.table({"shadow": [0, 0], "image_id": ["m3", "q-copy"], "in_training": [False, True],
                                    "loss": [0.1, 0.1]}, schema=MIA_SHADOW_SCHEMA), {"training_steps": 5000})
    mia.check_trained_shadows(folder, {0: 5000}, {0: {"m3": False, "q-copy": True}})  # the same half
    with pytest.raises(MemexError, match=r"shadow model 0 .* was trained on another half of the images than this run "
                                         r"plans \(1 differ, e.g. q-copy\): remove .*shadows to train"):
        mia.check_trained_shadows(folder, {0: 5000}, {0: {"m3": False, "q-copy": False}})


def test_the_driver_gives_each_shadow_steps_by_the_rows_of_its_half(world, tmp_path, monkeypatch, caplog):
    """The driver counts a shadow's rows as the shadow's training data holds them: a picture with 4
    copies is 4 rows. logo-00 under 4 ids is one member with 4 copies; the target trained 300 steps on
    its 6 rows, so a shadow holding logo-00 and k other pictures trains round(300 (4 + k) / 6). No shadow
    trains the target's 300 here, the count of before. A set far smaller than the target's (a sample of
    its training set) is said once in a warning that names mia.shadow_steps."""
    root, model, members, nonmembers = world
    m = pq.read_table(members)
    extra = [m.slice(0, 1).set_column(0, "id", pa.array([f"logo-00-{k}"])) for k in range(3)]
    pq.write_table(pa.concat_tables([m, *extra]), tmp_path / "members.parquet")
    seen = {}

    class Planned(Exception):
        pass

    def run_tasks(folder, units, fn, resources, **shared):
        seen.update(units)
        raise Planned

    monkeypatch.setattr(mia.runner, "run_tasks", run_tasks)
    with pytest.raises(Planned):
        mia.run(cfg_of(world, f"members.path={tmp_path / 'members.parquet'}", "run.name=steps", "mia=lira",
                       "mia.shadow_models=2", "mia.attacks=[loss]", "resources.executor=local"))
    layout = MiaLayout(str(root / "runs"), "steps")
    images = layout.store.read_table(layout.images_path)
    ids = images["image_id"].to_pylist()
    copies = dict(zip(ids, images["copies"].to_pylist()))
    assert copies["logo-00"] == 4
    assert sorted(seen) == [0, 1] and len(ids) == 2 * N  # one unit a shadow; logo-00's 3 extra ids are one image
    rows_of = {0: 0, 1: 0}
    for s, unit in seen.items():
        # rows as built here: logo-00 is 4 rows (itself + 3 copies), every other image 1
        rows_of[s] = sum(4 if i == "logo-00" else 1 for i, inside in zip(ids, unit["inside"]) if inside)
        assert unit["steps"] == round(STEPS * rows_of[s] / N)
    assert sum(rows_of.values()) == 2 * N + 3  # every image in exactly one of the two halves
    assert sorted(u["steps"] for u in seen.values()) != [STEPS, STEPS]
    assert "LiRA's shadows hold" not in caplog.text  # halves of ~7 rows against the target's 6

    recipe = {"trainer": {"steps": 5000, "warmup_steps": 100}, "examples": 560}
    with caplog.at_level("WARNING", logger="memex.mia"):
        mia.warn_small_shadows(recipe, [352, 470], None)
        mia.warn_small_shadows(recipe, [60, 80], 300)  # steps given: the user's choice
        assert "LiRA's shadows hold" not in caplog.text
        mia.warn_small_shadows(recipe, [60, 80], None)
    assert "hold 60-80 training rows each and the target trained on 560" in caplog.text
    assert "train 536-714 steps" in caplog.text and "mia.shadow_steps" in caplog.text

    # the target duplicated images, and members.path is the source manifest (no copies): said, naming the fix
    caplog.clear()
    source = images.set_column(images.column_names.index("copies"), "copies", pa.nulls(images.num_rows, pa.int32()))
    with caplog.at_level("WARNING", logger="memex.mia"):
        mia.warn_missing_copies({"data": {"duplication": []}}, source)
        mia.warn_missing_copies({"data": {"duplication": [{"count": 2, "copies": 32}]}}, images)  # copies given
        assert "members.path gives no copies" not in caplog.text
        mia.warn_missing_copies({"data": {"duplication": [{"count": 2, "copies": 32}, {"count": 4, "copies": 8}]}},
                                source)
    assert "up to 32 copies of an image) and members.path gives no copies" in caplog.text
    assert "training_manifest.parquet" in caplog.text


@pytest.mark.parametrize("seed", range(3))
def test_lira_fits_its_gaussians_to_the_log_of_the_loss(seed):
    """An image's error scales with how hard it is (the demo's losses span 0.009-0.13), and a member's
    is a fraction of it. With 4 shadows LiRA pools one variance over all images: on the raw error that
    variance is the hard images', and the easy ones' membership drowns in it (offline AUC ~0.95 here,
    0.750 on the demo); on its log every image differs by the same step (~0.995 here, 0.947 on the demo:
    bench/lira_scale.py)."""
    from memex.mia import lira_offline, shadow_splits

    rng = np.random.default_rng(seed)
    n = 400
    ids = [f"i{j:03d}" for j in range(n)]
    inside = shadow_splits(ids, 4, seed=0)
    hard = np.exp(rng.uniform(np.log(0.01), np.log(0.13), n))
    loss = lambda m: hard * np.where(m, 0.8, 1.0) * np.exp(rng.normal(0, 0.05, m.shape))  # noqa: E731
    member = rng.random(n) < 0.5
    target, shadow_losses = loss(member), loss(inside)
    scores = pa.table({"image_id": ids, "loss": pa.array(target, pa.float32())})
    shadows = pa.table({"shadow": [s for s in range(4) for _ in ids], "image_id": ids * 4,
                        "in_training": inside.ravel().tolist(), "loss": shadow_losses.ravel().astype(np.float32)})
    table = mia.lira(scores, shadows, 4)
    from memex.mia_metrics import roc_auc

    on_log = roc_auc(table["lira_offline"].to_numpy(), member)
    on_raw = roc_auc(lira_offline(target, shadow_losses, inside, global_variance=True), member)
    assert on_log > 0.98 and on_log > on_raw + 0.03, (on_log, on_raw)


def test_non_members_that_are_near_copies_of_a_member_are_left_out_and_named(tmp_path):
    """A held-out image that is a re-encoding (JPEG q=70), a resize (3/4) or a 2-grey-level shift of a member is a
    picture the model trained on; scored as a non-member it counts against the attack (LAION holds many such
    copies). Only byte-identical pixels were refused. Now each is left out of scoring and quarantined with
    its member and distance; distinct non-members (and the members) are kept, low-detail ones too."""
    import io

    from PIL import Image

    rng = np.random.default_rng(4)

    def smooth():
        return np.asarray(Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).resize((96, 64),
                                                                                                  Image.BICUBIC))

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    members = [smooth() for _ in range(4)]
    jpeg = io.BytesIO()
    Image.fromarray(members[0]).save(jpeg, format="JPEG", quality=70)
    near = [jpeg.getvalue(), png(np.asarray(Image.fromarray(members[1]).resize((72, 48), Image.BICUBIC))),
            png(np.clip(members[2].astype(int) + 2, 0, 255).astype(np.uint8))]
    others = [png(smooth()) for _ in range(3)]
    # two different near-black night shots: within 0.02 of each other, yet distinct pictures (too little
    # detail to tell a copy: the member is not matched, and the non-member, a low-loss one, stays)
    dark = [png((smooth() // 40 + k).astype(np.uint8)) for k in (0, 2)]
    rows = [("m0", png(members[0]), True), ("m1", png(members[1]), True), ("m2", png(members[2]), True),
            ("m3", png(members[3]), True), ("m-dark", dark[0], True), ("n-jpeg", near[0], False),
            ("n-resized", near[1], False), ("n-shifted", near[2], False), ("n-dark", dark[1], False)] + \
        [(f"n-other{k}", o, False) for k, o in enumerate(others)] + [("q-copy", png(members[3]), None),
                                                                      ("m0-again", png(members[0] // 2 * 2), True)]
    q_jpeg = io.BytesIO()
    Image.fromarray(members[2]).save(q_jpeg, format="JPEG", quality=70)
    rows += [("q-jpeg", q_jpeg.getvalue(), None)]  # "is my re-saved image in there?"
    images = pa.table({"image_id": [r[0] for r in rows], "image": [r[1] for r in rows], "uri": [None] * len(rows),
                       "member": [r[2] for r in rows], "caption": [None] * len(rows), "copies": [None] * len(rows)},
                      schema=pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("uri", pa.string()),
                                        ("member", pa.bool_()), ("caption", pa.string()), ("copies", pa.int32())]))
    ok, quarantine, split_as, _ = mia.check_sets(images, {})
    assert sorted(ok["image_id"].to_pylist()) == ["m-dark", "m0", "m0-again", "m1", "m2", "m3", "n-dark", "n-other0",
                                                  "n-other1", "n-other2", "q-copy", "q-jpeg"]
    # a questioned image holding a member's picture under its own id, or a near copy of it (a JPEG re-save:
    # it got a split of its own, so ~S/4 of the member's out-shadows trained on a near-identical picture),
    # and a member that is a near copy of another (a JPEG re-encoding under its own id), take that image's
    # shadow split: LiRA split them independently, so half the member's out-shadows trained on its picture
    assert split_as == {"q-copy": "m3", "q-jpeg": "m2", "m0-again": "m0"}
    split = mia.splits_of(ok["image_id"].to_pylist(), split_as, 8, 0)
    col = {i: k for k, i in enumerate(ok["image_id"].to_pylist())}
    assert (split[:, col["q-copy"]] == split[:, col["m3"]]).all() and (split.sum(axis=0) == 4).all()
    assert (split[:, col["m0-again"]] == split[:, col["m0"]]).all()
    why = dict(zip(quarantine["id"].to_pylist(), quarantine["reason"].to_pylist()))
    assert sorted(why) == ["n-jpeg", "n-resized", "n-shifted"]
    for n, m in (("n-jpeg", "m0"), ("n-resized", "m1"), ("n-shifted", "m2")):
        assert why[n].startswith(f"a near copy of member {m} (RMS 0.0")
    rms = [float(why[n].split("RMS ")[1].split()[0]) for n in why]
    assert max(rms) < mia.NEAR_COPY_RMS / 2  # well inside; the distinct pictures are far out:
    t = {i: mia.thumb(np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))) for i, b, _ in rows}
    far = min(np.sqrt(np.mean((t[o] - t[m]) ** 2)) for o in ("n-other0", "n-other1", "n-other2")
              for m in ("m0", "m1", "m2", "m3"))
    assert far > 5 * mia.NEAR_COPY_RMS
    dark_rms = np.sqrt(np.mean((t["n-dark"] - t["m-dark"]) ** 2))
    assert dark_rms < mia.NEAR_COPY_RMS and t["m-dark"].std() < mia.NEAR_COPY_MIN_STD  # kept only by the floor


def test_a_resume_on_images_changed_under_the_same_ids_is_refused(world, tmp_path):
    """The settings key covers ids, labels and captions: non-members written again under the same ids (an
    image folder regenerated, a manifest's bytes replaced) resumed the folder, its finished units scored on
    the old pixels and the rest on the new. The pixels are recorded at the first run; a resume on others is
    refused, naming the images, and nothing is changed."""
    _, _, _, nonmembers = world
    held = tmp_path / "held.parquet"
    t = pq.read_table(nonmembers)
    pq.write_table(t, held)
    cfg = cfg_of(world, f"nonmembers.path={held}", "mia.attacks=[loss]", "run.name=px", "resources.executor=local",
                 f"storage.root={tmp_path / 'runs'}")
    first = mia.run(cfg)
    layout = MiaLayout(cfg.storage.root, "px")
    scores = layout.scores.read()
    other = pq.read_table(logo_set(tmp_path / "other.parquet", [40]))["image"][0]
    pq.write_table(t.set_column(t.column_names.index("image"), "image",
                                pa.array([other.as_py()] + t["image"].to_pylist()[1:], pa.binary())), held)
    with pytest.raises(MemexError, match=rf"1 images changed since mia folder .*px/mia scored them, under the same "
                                         rf"ids \({t['id'][0].as_py()}\): resuming would mix"):
        mia.run(cfg)
    assert layout.scores.read().equals(scores)
    pq.write_table(t, held)  # restored: resumes, the same
    assert mia.run(cfg)["attacks"] == first["attacks"]


def test_a_resume_with_other_weights_at_the_same_model_path_is_refused(world, tmp_path):
    """The settings hold model.path, not its weights: a model trained again into the same folder resumed the
    folder and mixed the old weights' scores with the new ones'. weights.json records them; a resume on
    others is refused, naming the fix, and nothing is changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from memex.checkpoints import CheckpointError

    model = tmp_path / "model"
    shutil.copytree(world[1], model)
    cfg = cfg_of(world, f"model.path={model}", "mia.attacks=[loss]", "run.name=w", "resources.executor=local",
                 f"storage.root={tmp_path / 'runs'}")
    mia.run(cfg)
    layout = MiaLayout(cfg.storage.root, "w")
    scores = layout.scores.read()
    f = next((model / "unet").glob("*.safetensors"))
    weights = load_file(f)
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in weights.items()}, f)  # trained again
    with pytest.raises(CheckpointError, match=rf"the weights at model.path={model} changed since mia folder .*w/mia "
                                              r"was written with them .*Nothing was changed"):
        mia.run(cfg)
    assert layout.scores.read().equals(scores)


def test_copies_of_a_memex_train_manifest_are_one_image_each(world, tmp_path):
    """training_manifest.parquet holds one row per copy (source_id, copies): read as one image with its copies."""
    _, model, _, _ = world
    m = pq.read_table(model / "training_manifest.parquet").drop(["source_id", "copies"])
    ids = m["id"].to_pylist()
    doubled = pa.concat_tables([m, m.set_column(0, "id", pa.array([f"{i}#1" for i in ids]))])
    doubled = doubled.append_column("source_id", pa.array(ids * 2)).append_column("copies", pa.array([2] * 2 * N))
    pq.write_table(doubled, tmp_path / "train.parquet")
    t = mia.read_image_set(str(tmp_path / "train.parquet"), "caption", True, {}, "members.path")
    assert t.num_rows == N and set(t["copies"].to_pylist()) == {2}
    assert not any("#" in i for i in t["image_id"].to_pylist())


@pytest.mark.parametrize("case", ["same_id", "same_picture", "same_path", "one_shadow", "odd_shadows",
                                  "no_recipe", "no_captions", "query_without_caption", "empty_attacks", "query_clash",
                                  "unrun_attack_setting", "shadow_steps_without_lira",
                                  "query_column_without_queries", "missing_members", "empty_queries",
                                  "undecodable_nonmembers", "root_inside_nonmembers", "few_timesteps",
                                  "demo_nonmembers_for_another_model", "cuda_without_a_gpu", "lease_timeout_0"])
def test_bad_inputs_are_refused_before_any_work(world, tmp_path, tiny_models, case):
    root, model, members, nonmembers = world
    extra = []
    if case == "same_id":  # a non-member listed under a member's id
        extra = [f"nonmembers.path={logo_set(tmp_path / 'n.parquet', [50], ['logo-00'])}"]
        match = "share 1 ids (logo-00)"
    elif case == "same_picture":  # a member's picture under another id
        extra = [f"nonmembers.path={logo_set(tmp_path / 'n.parquet', [2, 60], ['other', 'x'])}"]
        match = "same picture as a member (other = logo-02)"
    elif case == "same_path":
        extra = [f"nonmembers.path={members}"]
        match = "members.path and nonmembers.path are the same"
    elif case == "one_shadow":
        extra = ["mia.shadow_models=1"]
        match = "mia.shadow_models must be >= 2"
    elif case == "odd_shadows":
        extra = ["mia.shadow_models=3"]
        match = "even"
    elif case == "no_recipe":  # LiRA needs the target's memex train recipe
        extra = [f"model.path={tiny_models['unconditional']}", "mia=lira"]
        match = "no memex_train.json"
    elif case == "no_captions":  # a text model and a captionless set
        pq.write_table(pq.read_table(nonmembers).drop(["caption"]), tmp_path / "n.parquet")
        extra = [f"model.path={tiny_models['pixel_text']}", f"nonmembers.path={tmp_path / 'n.parquet'}"]
        match = "of nonmembers.path has no caption: set nonmembers.caption_column to the column"
    elif case == "query_without_caption":  # named members / nonmembers' keys for a query's
        pq.write_table(pq.read_table(nonmembers).slice(0, 1).drop(["caption"]), tmp_path / "q.parquet")
        q = pq.read_table(tmp_path / "q.parquet")
        pq.write_table(q.set_column(0, "id", pa.array(["questioned"])), tmp_path / "q.parquet")
        extra = [f"model.path={tiny_models['pixel_text']}", f"queries.path={tmp_path / 'q.parquet'}"]
        match = "image questioned of queries.path has no caption: set queries.caption_column"
    elif case == "query_clash":  # a questioned image under a labelled image's id
        extra = [f"queries.path={logo_set(tmp_path / 'q.parquet', [70], ['logo-07'])}"]
        match = "queries.path shares 1 ids with the labelled sets (logo-07)"
    elif case == "unrun_attack_setting":  # a setting of an attack that does not run used to be ignored
        extra = ["mia.attacks=[loss,pia]", "mia.secmi_k=5"]
        match = "mia.secmi_k is set, and it is a setting of the secmi attack"
    elif case == "query_column_without_queries":
        extra = ["queries.caption_column=text"]
        match = "queries.caption_column is set, and no queries.path is"
    elif case == "missing_members":  # the message named trainset.path, a key memex mia does not have
        extra = [f"members.path={tmp_path / 'nowhere'}"]
        match = f"members.path={tmp_path / 'nowhere'} does not exist"
    elif case == "empty_queries":
        (tmp_path / "empty").mkdir()
        extra = [f"queries.path={tmp_path / 'empty'}"]
        match = f"queries.path={tmp_path / 'empty'} holds no images"
    elif case == "undecodable_nonmembers":  # named both keys, whichever side had no image
        bad = tmp_path / "bad"
        bad.mkdir()
        for n in ("a.png", "b.png"):
            (bad / n).write_bytes(b"x")
        extra = [f"nonmembers.path={bad}"]
        match = "none of the 2 images of nonmembers.path is left to score (first reason: UnidentifiedImageError"
    elif case == "root_inside_nonmembers":  # its Parquet outputs would be read as non-members next time
        (tmp_path / "held").mkdir()
        extra = [f"nonmembers.path={tmp_path / 'held'}", f"storage.root={tmp_path / 'held' / 'runs'}"]
        match = f"storage.root={tmp_path / 'held' / 'runs'} ({tmp_path / 'held' / 'runs'}) is inside nonmembers.path"
    elif case == "few_timesteps":  # a 100-step model: found in the actors, after the folder was claimed
        import shutil

        shutil.copytree(world[1], tmp_path / "short")
        conf = tmp_path / "short" / "scheduler" / "scheduler_config.json"
        conf.write_text(json.dumps(json.loads(conf.read_text()) | {"num_train_timesteps": 100}))
        extra = [f"model.path={tmp_path / 'short'}"]
        match = "mia.loss_timestep=100 is outside the scheduler's timesteps 0..99"
    elif case == "demo_nonmembers_for_another_model":  # conf/mia.yaml's default beside another model.path: another
        from memex.config import MEMEX_HOME  # distribution than its members, every attack near-perfect

        extra = [f"nonmembers.path={Path(MEMEX_HOME) / 'demo' / 'data' / 'heldout.parquet'}"]
        match = f"nonmembers.path is the demo's held-out logos (the default), and model.path={model} is not a demo"
    elif case == "cuda_without_a_gpu":  # Ray actors given no GPU: refused as audit, generate and nightly refuse it
        extra = ["resources.executor=ray", "resources.device=cuda"]
        match = "resources.device=cuda, and resources.num_gpus=0"
    elif case == "lease_timeout_0":  # the heartbeat rewrote _lease.json in a tight loop
        extra = ["storage.lease_timeout_s=0"]
        match = "storage.lease_timeout_s must be >= 1"
    elif case == "shadow_steps_without_lira":
        extra = ["mia.shadow_steps=300"]
        match = "mia.shadow_steps is set, and LiRA is off"
    else:
        extra = ["mia.attacks=[]"]
        match = "mia.attacks is empty"
    runs = tmp_path / "runs"
    with pytest.raises(MemexError, match=match.replace("(", r"\(").replace(")", r"\)")):
        mia.run(cfg_of(world, f"storage.root={runs}", *extra))
    assert not runs.exists() and not (tmp_path / "held" / "runs").exists()  # refused before anything was written


def test_metrics_by_copies_compare_each_group_with_every_non_member():
    scores = pa.table({"image_id": ["a", "b", "c", "d", "e"], "member": [True, True, False, False, True],
                       "copies": pa.array([1, 32, None, None, 32], pa.int32()),
                       "loss": pa.array([0.5, 0.1, 0.3, 0.4, 0.2], pa.float32())})
    out = mia.summarize(scores, None, ["loss"])
    assert out["attacks"]["loss"]["auc"] == pytest.approx(4 / 6, abs=1e-4)  # a (0.5) is above both non-members
    assert out["by_copies"]["32"] == {"members": 2, "auc": {"loss": 1.0}}
    assert out["by_copies"]["1"] == {"members": 1, "auc": {"loss": 0.0}}
    assert out["attacks"]["loss"]["balanced_accuracy"] == pytest.approx(5 / 6, abs=1e-4)  # b, e above c, d; a below


@pytest.mark.slow
def test_on_the_demo_checkpoint_every_attack_ranks_its_most_copied_members_first():
    """The shipped demo model saw 8 logos 32 times each: against 24 held-out logos of the same
    generator, every attack scores them as members (measured AUC: loss 0.99, PIA 0.94, SecMI 0.77).
    On the 300-step toy above, PIA and SecMI rank the other way (AUC ~0): it has not learned the small
    timesteps they read (docs/method.md, "Membership inference")."""
    from memex.config import MiaSettings
    from memex.images import decode
    from memex.mia import MiaScorer
    from memex.mia_metrics import member_score, roc_auc
    from memex.models import load_model

    from conftest import REPO

    m = pq.read_table(REPO / "demo/models/demo-text/training_manifest.parquet").to_pylist()
    rows = [r for r in m if r["copies"] == 32 and r["id"] == r["source_id"]]
    rows += pq.read_table(REPO / "demo/data/heldout.parquet").to_pylist()[:24]
    raw = MiaScorer(load_model(str(REPO / "demo/models/demo-text")), MiaSettings()).score(
        [r["id"] for r in rows], [decode(r["image"]) for r in rows], [r["caption"] for r in rows])
    labels = np.array([r.get("copies") == 32 for r in rows])
    assert labels.sum() == 8
    auc = {a: roc_auc(member_score(a, v), labels) for a, v in raw.items()}
    assert auc["loss"] >= 0.9 and auc["pia"] >= 0.8 and auc["secmi"] >= 0.65, auc


def test_query_images_get_a_p_value_against_the_non_members_and_stay_out_of_the_metrics():
    """queries.path: images whose membership is the question. Not in the AUC; each gets the share of
    non-members that score at least as member-like (1/(1+n) for one above them all)."""
    scores = pa.table({"image_id": ["m1", "m2", "n1", "n2", "n3", "q-low", "q-high"],
                       "member": pa.array([True, True, False, False, False, None, None], pa.bool_()),
                       "copies": pa.array([None] * 7, pa.int32()),
                       "loss": pa.array([0.1, 0.2, 0.5, 0.6, 0.7, 0.05, 0.9], pa.float32())})
    out = mia.summarize(scores, None, ["loss"])
    assert out["attacks"]["loss"]["auc"] == 1.0  # the queries (one very member-like) are not counted
    p = {q["image_id"]: q["p_value"]["loss"] for q in out["queries"]}
    assert p == {"q-low": pytest.approx(1 / 4, abs=1e-4), "q-high": 1.0}  # loss 0.05: below all 3 non-members
    # Benjamini-Hochberg over the 2 queries: the smaller p-value x 2 / 1, the larger x 2 / 2
    q = {r["image_id"]: r["q_value"]["loss"] for r in out["queries"]}
    assert q == {"q-low": pytest.approx(1 / 2, abs=1e-4), "q-high": 1.0}
    assert "q-value loss 0.500" in mia.format_summary({**out, "model": "m", "members": 2, "nonmembers": 3,
                                                        "quarantined": 0, "unet_evaluations": 0, "shadow_models": 0,
                                                        "run": "r"})
    # a query whose score is NaN sorted above every non-member: the smallest p-value, the strongest evidence
    bad = scores.set_column(3, "loss", pa.array([0.1, 0.2, 0.5, 0.6, 0.7, float("nan"), 0.9], pa.float32()))
    from memex.models import ModelError

    with pytest.raises(ModelError, match="query image q-low has a non-finite loss score"):  # a MemexError: one line
        mia.summarize(bad, None, ["loss"])


def test_a_memex_train_model_scores_its_members_prepared_as_it_was_trained(world, tiny_models):
    """memex train squashes every image to its square resolution; memex mia's default centre crop
    scored a 3:2 member on pixels the model never saw (~70/255 a pixel off), understating every
    attack. mia.preprocess unset is now the model's own: resize for a memex train model
    (memex_train.json), the centre crop for others; a value given is kept, and the resolved one is
    what the run folder records."""
    from memex.images import resize
    from memex.mia import to_model_images

    assert mia.with_preprocess(cfg_of(world)).mia.preprocess == "resize"
    assert mia.with_preprocess(cfg_of(world, "mia.preprocess=center_crop")).mia.preprocess == "center_crop"
    assert mia.with_preprocess(cfg_of(world, f"model.path={tiny_models['unconditional']}")).mia.preprocess == \
        "center_crop"
    wide = np.concatenate([synth.logo(1, 32, 0)[0], synth.logo(2, 32, 0)[0][:, :16]], axis=1)  # 48 x 32
    trained_on = torch.tensor(resize(wide, SIZE)).permute(2, 0, 1).float()[None] / 127.5 - 1  # memex/training.py
    scored = to_model_images([wide], SIZE, 3, mia.with_preprocess(cfg_of(world)).mia.preprocess)
    assert torch.equal(scored, trained_on)
    assert (to_model_images([wide], SIZE, 3, "center_crop") - trained_on).abs().mean() > 0.05
    s = mia.run(cfg_of(world, "run.name=pre", "resources.executor=local", "mia.attacks=[loss]"))
    assert json.loads((Path(s["run"]) / "mia" / "run.json").read_text())["mia"]["preprocess"] == "resize"


def test_one_picture_under_several_member_ids_is_one_member_with_its_copies(world, tmp_path):
    """LAION-style duplicates: one picture stored under several ids. It counted as several members
    (its weight in the TPR at low FPR multiplied, the by-copies table empty) and LiRA placed each
    copy in shadows independently. Now the rows of one decoded picture are one member, its first
    id, with their count as its copies; a duplicated non-member is one non-member."""
    root, model, members, nonmembers = world
    m, n = pq.read_table(members), pq.read_table(nonmembers)
    dup = pa.concat_tables([m, m.slice(0, 1).set_column(0, "id", pa.array(["logo-00-again"])),
                            m.slice(0, 1).set_column(0, "id", pa.array(["logo-00-third"]))])
    pq.write_table(dup, tmp_path / "members.parquet")
    held = pa.concat_tables([n, n.slice(0, 1).set_column(0, "id", pa.array(["zz-copy"]))])
    pq.write_table(held, tmp_path / "heldout.parquet")
    s = mia.run(cfg_of(world, f"members.path={tmp_path / 'members.parquet'}", "run.name=dups",
                       f"nonmembers.path={tmp_path / 'heldout.parquet'}", "resources.executor=local",
                       "mia.attacks=[loss]"))
    assert (s["members"], s["nonmembers"]) == (N, N)
    scores = MiaLayout(str(root / "runs"), "dups").scores.read().to_pylist()
    copies = {r["image_id"]: r["copies"] for r in scores if r["member"]}
    assert copies["logo-00"] == 3 and "logo-00-again" not in copies and "zz-copy" not in {r["image_id"] for r in scores}
    assert sorted(c for c in copies.values() if c is not None) == [3]


def test_non_finite_scores_are_named_before_any_shadow_trains(world, monkeypatch):
    """A diverged checkpoint (NaN weights, float16 overflow) wrote NaN scores without a word; with LiRA
    the run failed only after training every shadow ("losses must be finite"), without it at the metrics
    with no attack or image named. Refused once the target's scores are in, naming both, before any
    shadow is trained."""
    from memex.mia import MiaScorer

    real = MiaScorer.score

    def diverged(self, ids, images, captions, attacks):
        out = real(self, ids, images, captions, attacks)
        out["loss"] = np.where(np.arange(len(ids)) == 0, np.nan, out["loss"])  # the first image of every unit
        return out

    def run_tasks(*a, **k):
        raise AssertionError("a shadow was trained")

    monkeypatch.setattr(MiaScorer, "score", diverged)
    monkeypatch.setattr(mia.runner, "run_tasks", run_tasks)
    from memex.models import ModelError

    with pytest.raises(ModelError, match=r"images have a non-finite loss score \(e\.g\. .*\): model.path=.* "
                                         r"not finite there .*no shadow model was trained"):
        mia.run(cfg_of(world, "run.name=diverged", "mia=lira", "mia.shadow_models=2", "mia.attacks=[loss]",
                       "resources.executor=local"))


def test_a_picture_stored_in_two_tight_clusters_is_one_group_of_near_copies():
    """near_groups joined images through each one's 8 nearest thumbnails: a picture stored 20 times as two
    clusters of re-encodings (two sizes, 0.012 RMS apart, under NEAR_COPY_RMS = 0.02) had every image's 8
    nearest in its own cluster, so it was two groups, each with its own shadow split, and an out-shadow of one
    trained on the other's near-identical picture. Every pair within the threshold joins now; a picture
    further away than it stays apart."""
    from memex.stages.mia import THUMB, near_groups

    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, THUMB * THUMB * 3).astype(np.float32)
    other = rng.uniform(0, 1, THUMB * THUMB * 3).astype(np.float32)
    jitter = lambda: rng.normal(0, 0.001, base.shape).astype(np.float32)  # noqa: E731
    thumbs = {**{f"a{i}": base + jitter() for i in range(10)}, **{f"b{i}": base + 0.012 + jitter() for i in range(10)},
              "c0": other, "c1": other + 0.03}  # 0.03 apart: not near copies
    groups = near_groups(thumbs, list(thumbs))
    assert {i: groups.get(i, i) for i in thumbs} == {**{f"a{i}": "a0" for i in range(10)},
                                                     **{f"b{i}": "a0" for i in range(10)}, "c0": "c0", "c1": "c1"}


def test_a_grayscale_models_sets_are_checked_in_the_luma_it_scores():
    """A 1-channel model scores every image's luma (memex.mia.to_model_images): a colour member and its
    black-and-white copy are one input to it. The set checks compared RGB, so such a copy held out as a
    non-member was neither refused nor left out, and was scored as a non-member the model trained on. With
    gray=True it is refused as the member's picture; an RGB model's sets are checked in RGB, as before (and
    the pixels recorded for a resume stay the stored RGB's either way)."""
    import io

    from PIL import Image

    from memex.images import luma_rgb

    rng = np.random.default_rng(3)
    member = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64),
                                                                                                   Image.BICUBIC))
    other = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64),
                                                                                                  Image.BICUBIC))

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    rows = [("m0", png(member), True), ("n-gray", png(luma_rgb(member)), False), ("n1", png(other), False)]
    images = pa.table({"image_id": [r[0] for r in rows], "image": [r[1] for r in rows], "uri": [None] * 3,
                       "member": [r[2] for r in rows], "caption": [None] * 3, "copies": [None] * 3},
                      schema=pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("uri", pa.string()),
                                        ("member", pa.bool_()), ("caption", pa.string()), ("copies", pa.int32())]))
    ok, quarantine, _, pixels = mia.check_sets(images, {})  # RGB: two pictures
    assert sorted(ok["image_id"].to_pylist()) == ["m0", "n-gray", "n1"]
    with pytest.raises(ConfigError, match=r"1 non-member images are the same picture as a member \(n-gray = m0\)"):
        mia.check_sets(images, {}, gray=True)
    kept = images.filter(pa.array([r[0] != "n-gray" for r in rows]))
    assert mia.check_sets(kept, {}, gray=True)[3] == {i: pixels[i] for i in ("m0", "n1")}  # RGB digests recorded
