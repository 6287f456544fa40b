"""`memex train`: short real runs on a few synthetic logos, resume, and bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memex.config import ConfigError, SamplingConfig
from memex.images import encode_png
from memex.manifest import ManifestError
from memex.models import load_model
from memex.sampling import Sampler
from memex.synth import logo
from memex.training import INFO_FILE, MANIFEST_FILE, latest_checkpoint, train

from conftest import BIN


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from memex.cli import CONF_DIR, to_train_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_train_config(compose(config_name="train", overrides=overrides))


@pytest.fixture
def manifest(tmp_path):
    rows = [logo(i, 16) for i in range(6)]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"i{k}" for k in range(6)], "image": [encode_png(im) for im, _ in rows],
                             "caption": [c for _, c in rows]}), path)
    return path


def _cfg(manifest, out, *extra):
    text = [] if "arch=uncond_small" in extra else ["arch.max_length=24"]  # refused for unconditional models
    return _compose([f"data.path={manifest}", f"output={out}", "trainer=quick", "trainer.steps=6",
                     "trainer.checkpoint_every=3", "arch.resolution=16", "arch.block_out_channels=[8,16]",
                     *text, "data.duplication=[{copies: 4, count: 2}]", *extra])


def _killed_before_the_final_save(out):
    """A finished run's folder made into one killed mid-run (steps ahead to go): the checkpoints, and no model
    (model_index.json) or memex_train.json, which the final save writes."""
    for name in (INFO_FILE, "model_index.json"):
        (out / name).unlink()


@pytest.mark.parametrize("arch", ["text_small", "uncond_small"])
def test_short_run_saves_a_loadable_diffusers_folder(manifest, tmp_path, arch):
    out = train(_cfg(manifest, tmp_path / "model", f"arch={arch}"))
    info = json.loads((out / INFO_FILE).read_text())
    assert info["steps"] == 6 and info["examples"] == 2 * 4 + 4 and info["distinct_images"] == 6
    used = pq.read_table(out / MANIFEST_FILE)
    assert used.num_rows == 12 and sorted(used["copies"].to_pylist()).count(4) == 8
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors only
    model = load_model(str(out))  # the same loader `memex generate` uses
    assert model.kind.value == ("pixel_text" if arch == "text_small" else "unconditional")
    s = Sampler(model, SamplingConfig(num_inference_steps=2, guidance_scale=2.0, batch_size=2))
    img = s.generate(["p"], ["" if arch == "uncond_small" else "a red circle logo"], [0])
    assert img.shape == (1, 16, 16, 3)


def test_resume_continues_from_the_checkpoint(manifest, tmp_path):
    full = train(_cfg(manifest, tmp_path / "full"))
    # an interrupted run: stops after 3 steps, leaving checkpoint-3 and no final model
    part = _cfg(manifest, tmp_path / "resumed", "trainer.steps=3")
    train(part)
    _killed_before_the_final_save(tmp_path / "resumed")
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "checkpoint-3"
    resumed = train(_cfg(manifest, tmp_path / "resumed"))
    assert json.loads((resumed / INFO_FILE).read_text())["resumed_from"] == 3
    # per-step seeded batches + restored optimizer state: the resumed weights equal the uninterrupted ones
    a = load_model(str(full)).pipe.unet.state_dict()
    b = load_model(str(resumed)).pipe.unet.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_resume_trains_on_the_text_encoder_its_checkpoint_trained_with(manifest, tmp_path, monkeypatch):
    """A text model's frozen encoder was rebuilt from trainer.seed on resume: a torch or transformers version
    that initialises it otherwise (stood in for here by another seed) changed every caption's conditioning
    mid-run, and the model shipped the new encoder. The checkpoint holds the encoder now, and the resume
    loads it: the same encoder, and UNet, as the uninterrupted run."""
    from memex import tiny

    full = train(_cfg(manifest, tmp_path / "full"))
    train(_cfg(manifest, tmp_path / "resumed", "trainer.steps=3"))
    _killed_before_the_final_save(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-3" / "text_encoder").is_dir()
    build = tiny.build_text_encoder
    monkeypatch.setattr(tiny, "build_text_encoder", lambda *a, seed=0, **kw: build(*a, seed=seed + 1, **kw))
    resumed = train(_cfg(manifest, tmp_path / "resumed"))
    for part in ("text_encoder", "unet"):
        a = getattr(load_model(str(full)).pipe, part).state_dict()
        b = getattr(load_model(str(resumed)).pipe, part).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), part


def test_an_fp16_runs_loss_scale_is_kept_in_its_checkpoint(tmp_path):
    """fp16 training runs a GradScaler (accelerate's): its scale and growth tracker are part of where the run
    is. They were not in the checkpoint, so a resumed fp16 run restarted at a scale of 65,536 and skipped
    updates (overflows) until it backed off again: not the uninterrupted run. Saved in optimizer.json and
    loaded on resume; a checkpoint with none (fp32, or written before) leaves a scaler as it starts. On CPU:
    the same GradScaler class on the cpu device (fp16 autocast needs a GPU, so the run itself is not)."""
    from memex import training
    from memex.config import ArchConfig, ArchKind

    unet = training.build_unet(ArchConfig(kind=ArchKind.unconditional, block_out_channels=[8, 16]), None)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    loss = unet(torch.randn(2, 3, 32, 32), torch.tensor([3, 7])).sample.float().pow(2).mean()
    scaler.scale(loss).backward()
    for p in unet.parameters():  # an overflow: the step is skipped and the scale backs off
        if p.grad is not None:
            p.grad.fill_(float("inf"))
            break
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    training._save_checkpoint(tmp_path / "checkpoints", 5, unet, opt, 2, {"r": 1}, scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    assert training._load_checkpoint(tmp_path / "checkpoints" / "checkpoint-5", unet, opt, fresh) == 5
    assert fresh.get_scale() == 2.0**15 and fresh.state_dict() == scaler.state_dict()

    (tmp_path / "fp32" / "_tmp-checkpoint-3" / "unet").mkdir(parents=True)  # a save killed at step 3
    training._save_checkpoint(tmp_path / "fp32", 5, unet, opt, 2, {"r": 1})  # an fp32 run: no scaler
    assert sorted(p.name for p in (tmp_path / "fp32").iterdir()) == ["checkpoint-5"]  # the killed one's removed
    assert "grad_scaler" not in json.loads((tmp_path / "fp32" / "checkpoint-5" / "optimizer.json").read_text())
    other = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    training._load_checkpoint(tmp_path / "fp32" / "checkpoint-5", unet, opt, other)
    assert other.get_scale() == 2.0**16


def test_resume_refuses_checkpoints_of_another_recipe(manifest, tmp_path):
    """A checkpoint left by another lr, seed or training set used to be resumed silently: the model
    mixed two runs and its memex_train.json described neither."""
    out = tmp_path / "m"
    train(_cfg(manifest, out, "trainer.steps=3"))
    _killed_before_the_final_save(out)
    ck = out / "checkpoints" / "checkpoint-3"
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file())
    for extra, match in [(["trainer.lr=5e-4"], "trainer.lr differ"),
                         (["trainer.seed=1"], "trainer.seed differ"),
                         (["data.duplication=[{copies: 4, count: 3}]"], "the training set"),
                         (["arch.layers_per_block=2"], "arch.layers_per_block differ"),
                         (["trainer.steps=2"], "checkpoint-3 is past trainer.steps=2")]:
        with pytest.raises(ConfigError, match=re.escape(match)):
            train(_cfg(manifest, out, *extra))
    # nothing was overwritten: the checkpoint is still there to resume with the matching recipe
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()) == before
    # a checkpoint written before recipes were recorded cannot be checked: refused, naming the fix
    meta = json.loads((ck / "optimizer.json").read_text())
    (ck / "optimizer.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "recipe"}))
    with pytest.raises(ConfigError, match="has no recipe"):
        train(_cfg(manifest, out))
    (ck / "optimizer.json").write_text(json.dumps(meta))
    # the same recipe with more steps (and another checkpoint cadence) resumes
    done = train(_cfg(manifest, out, "trainer.checkpoint_every=2"))
    assert json.loads((done / INFO_FILE).read_text())["resumed_from"] == 3


def test_a_damaged_checkpoint_is_named_with_the_one_to_resume_from(manifest, tmp_path):
    """The latest checkpoint changed after it was written (a partial copy): truncated weights, a JSON
    file cut short, a missing optimizer state. Each used to be a traceback (JSONDecodeError, OSError
    from diffusers); now one line names the checkpoint and the older one to resume from, and doing
    as it says resumes."""
    out = tmp_path / "m"
    train(_cfg(manifest, out, "trainer.steps=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2"))
    _killed_before_the_final_save(out)
    ck = out / "checkpoints" / "checkpoint-4"
    weights, meta = ck / "unet" / "diffusion_pytorch_model.safetensors", ck / "optimizer.json"
    good = {p: p.read_bytes() for p in (weights, meta, ck / "optimizer.safetensors")}
    damage = [(weights, good[weights][:1000]), (meta, good[meta][:20]), (ck / "optimizer.safetensors", None)]
    for path, data in damage:
        path.unlink() if data is None else path.write_bytes(data)
        with pytest.raises(ConfigError, match=re.escape(f"{ck} is damaged or incomplete (") + ".*"
                           + re.escape("Delete that folder and rerun to resume from checkpoint-2")):
            train(_cfg(manifest, out, "trainer.steps=4", "trainer.checkpoint_every=2"))
        path.write_bytes(good[path])
    shutil.rmtree(ck)
    done = train(_cfg(manifest, out, "trainer.steps=4", "trainer.checkpoint_every=2"))
    assert json.loads((done / INFO_FILE).read_text())["resumed_from"] == 2


def test_bad_training_input_is_named(tmp_path, manifest):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.binary())}), empty)
    with pytest.raises(ManifestError, match="holds no rows"):
        train(_cfg(empty, tmp_path / "o1"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["ok", "broken"], "image": [encode_png(logo(0, 16)[0]), b"\x89PNG garbage"],
                             "caption": ["a", "b"]}), bad)
    with pytest.raises(ManifestError, match="'broken' cannot be decoded"):
        train(_cfg(bad, tmp_path / "o2"))
    with pytest.raises(ManifestError, match="'i0' is 16x16, the model takes 32x32"):
        train(_cfg(manifest, tmp_path / "o3", "arch.resolution=32", "data.resize=false"))
    with pytest.raises(ConfigError, match="arch.resolution=18 cannot pass 3 UNet levels"):
        _cfg(manifest, tmp_path / "o4", "arch.resolution=18", "arch.block_out_channels=[8,16,32]")
    with pytest.raises(ConfigError, match=r"data.duplication\[\].count must be >= 0, got -3"):
        _cfg(manifest, tmp_path / "o5", "data.duplication=[{copies: 4, count: -3}]")
    # text settings an unconditional model would ignore
    for key in ("arch.text_hidden=128", "trainer.cond_dropout=0.2", "data.caption_column=text"):
        with pytest.raises(ConfigError, match=f"{key.split('=')[0]} is set, and arch.kind=unconditional"):
            _cfg(manifest, tmp_path / "o6", "arch=uncond_small", key)
        _cfg(manifest, tmp_path / "o6", key)  # a text model reads it
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()  # nothing trained, nothing written
    with pytest.raises(ManifestError, match="cannot be decoded"):  # the folders made for output are removed again
        train(_cfg(bad, tmp_path / "deep" / "er" / "o"))
    assert not (tmp_path / "deep").exists()
    # an output that cannot be created fails in one line (it was a FileNotFoundError traceback after the data
    # was decoded), and a URL one (pathlib made a local folder "s3:")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="cannot be created"):
        train(_cfg(manifest, tmp_path / "a-file" / "m"))
    with pytest.raises(ConfigError, match="is a URL"):
        _cfg(manifest, "s3://bucket/models/m")
    # torch's AdamW raised a traceback for these; a dropout of 1.5 dropped every caption, silently
    with pytest.raises(ConfigError, match="trainer.lr must be > 0"):
        _cfg(manifest, tmp_path / "o7", "trainer.lr=0")
    with pytest.raises(ConfigError, match=r"trainer.cond_dropout must be in \[0, 1\)"):
        _cfg(manifest, tmp_path / "o7", "trainer.cond_dropout=1.5")


def test_cli_wrong_override_fails_before_training(tmp_path):
    r = subprocess.run([str(BIN / "memex"), "train", f"output={tmp_path}/m", "trainer.stepz=3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "stepz" in r.stderr
    assert not (tmp_path / "m").exists()


def test_a_list_caption_trains_on_its_first_caption(tmp_path):
    """COCO-style rows hold several captions an image. The audit and memex mia prompt with the
    first; memex train gave the list to the tokenizer, which read two captions as a text pair
    (trained on "cap1 cap2") and raised a bare TypeError for five."""
    from memex.training import load_training_set

    rows = [logo(i, 16) for i in range(4)]
    path = tmp_path / "coco.parquet"
    caps = [[c, f"another caption {k}", "a third", "a fourth", "a fifth"][: 2 + k] for k, (_, c) in enumerate(rows)]
    pq.write_table(pa.table({"id": [f"i{k}" for k in range(4)], "image": [encode_png(im) for im, _ in rows],
                             "caption": caps}), path)
    _, _, captions, _, _ = load_training_set(_cfg(path, tmp_path / "out"))
    assert captions == [c for _, c in rows]
    folder = train(_cfg(path, tmp_path / "out"))
    assert (folder / "model_index.json").is_file()


def test_the_number_of_training_processes_is_part_of_the_recipe(manifest, tmp_path, monkeypatch):
    """`accelerate launch --num_processes 4` draws 4 x trainer.batch_size examples a step. A run
    killed on 4 processes and resumed on 1 (or the reverse) was accepted, and its batches no longer
    matched the uninterrupted run's. Recorded in the recipe (left out at 1: earlier checkpoints still
    resume) and in memex_train.json, whose LiRA shadows, trained in one process, take the target's
    examples a step as their batch. The process count is simulated: the loop runs in this one."""
    import accelerate

    from memex.stages.mia import shadow_recipe

    out = tmp_path / "m"
    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 4))
    train(_cfg(manifest, out, "trainer.steps=3"))
    info = json.loads((out / INFO_FILE).read_text())
    assert info["processes"] == 4 and shadow_recipe(str(out))["trainer"]["batch_size"] == \
        4 * info["config"]["trainer"]["batch_size"]
    _killed_before_the_final_save(out)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"the number of training processes \(accelerate launch --num_processes: "
                                          r"was 4, now 1"):
        train(_cfg(manifest, out))
    one = train(_cfg(manifest, tmp_path / "one", "trainer.steps=3"))
    assert json.loads((one / INFO_FILE).read_text())["processes"] == 1
    assert shadow_recipe(str(one))["trainer"]["batch_size"] == json.loads((one / INFO_FILE).read_text())[
        "config"]["trainer"]["batch_size"]


def test_non_square_images_squashed_in_training_are_audited_squashed(tmp_path):
    """data.resize=true squashes a 24x16 picture to the model's 16x16: its copies are of the squashed
    picture. memex_train.json now counts such images, and an audit with the centre crop (the default,
    which compares with a picture the model never saw: a 3:2 exact copy is ~0.46 tiled l2 from it) is
    refused naming trainset.preprocess=resize; a square-trained model (the demo) is not."""
    import numpy as np

    from memex.config import ConfigError
    from memex.stages.audit import check_trained_shape

    from conftest import compose

    rows = [logo(i, 16) for i in range(4)]
    wide = [np.concatenate([im, im[:, :8]], axis=1) for im, _ in rows[:3]] + [rows[3][0]]  # 3 of them 24x16
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"id": [f"i{k}" for k in range(4)], "image": [encode_png(im) for im in wide],
                             "caption": [c for _, c in rows]}), path)
    out = train(_cfg(path, tmp_path / "m", "data.resize=true", "trainer.steps=2", "data.duplication=[]"))
    assert json.loads((out / INFO_FILE).read_text())["squashed_images"] == 3
    audit = ["trainset.path=/data/train.parquet", f"model.path={out}", "model=local"]
    with pytest.raises(ConfigError, match=r"on 3 non-square images squashed .*set trainset.preprocess=resize"):
        check_trained_shape(compose(audit, config_name="audit"))
    check_trained_shape(compose([*audit, "trainset.preprocess=resize"], config_name="audit"))
    check_trained_shape(compose([], config_name="audit"))  # the demo: square logos, nothing squashed


def test_a_models_own_training_manifest_and_stray_checkpoint_names_are_named(manifest, tmp_path):
    """Training on a model's training_manifest.parquet (memex train's expanded one: source_id and copies
    columns, one row per copy) failed after decoding every image with Arrow's "Field source_id exists 2
    times", and would have counted each copy as an image; it is refused naming the source manifest. A
    checkpoint-3.bak beside the checkpoints (a copy by hand) crashed the resume's int() sort; it is no
    checkpoint."""
    from memex.training import checkpoints

    out = train(_cfg(manifest, tmp_path / "m", "trainer.steps=3"))
    with pytest.raises(ManifestError, match=r"source_id and copies columns: it is a manifest `memex train` expanded"):
        train(_cfg(out / MANIFEST_FILE, tmp_path / "again"))
    assert not (tmp_path / "again").exists()
    # captions the tiny tokenizer cannot read (it maps them to its padding: these two trained as one caption)
    cjk = tmp_path / "cjk.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "image": [encode_png(logo(k, 16)[0]) for k in range(2)],
                             "caption": ["日本の犬", "猫のロゴ"]}), cjk)
    with pytest.raises(ManifestError, match=r"image 'a': its caption '日本の犬' has characters .*transliterate"):
        train(_cfg(cjk, tmp_path / "cjk", "data.duplication=[]"))
    # captions that differ only past what arch.max_length keeps (a character a token): they trained as one
    long = tmp_path / "long.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "image": [encode_png(logo(k, 16)[0]) for k in range(2)],
                             "caption": ["a skyline of the old harbour city at night", "a skyline of the old harbour "
                                         "city at noon"]}), long)
    with pytest.raises(ManifestError, match=r"2 captions differ only past the 30 tokens arch.max_length=32 keeps.*"
                                            r"set arch.max_length=36 \(the longest caption's tokens\)"):
        train(_cfg(long, tmp_path / "long", "data.duplication=[]", "arch.max_length=32"))
    assert not (tmp_path / "long").exists()
    run = tmp_path / "run"
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-3.bak"):
        (run / name).mkdir(parents=True)
    (run / "checkpoint-notes.txt").write_text("x")
    assert [p.name for p in checkpoints(run)] == ["checkpoint-2", "checkpoint-10"]  # by step, not by name


def test_a_run_killed_while_saving_leaves_no_finished_looking_folder(manifest, tmp_path, monkeypatch):
    """The final save wrote the pipeline, then the manifest, then memex_train.json in place: a run killed
    in between left a folder that loads without its training manifest, or a truncated memex_train.json
    that made every rerun refuse. Now memex_train.json is written last and atomically: a save that fails
    leaves none, and the rerun trains and finishes."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "m"
    real = DiffusionPipeline.save_pretrained

    def dies(self, *a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", dies)
    with pytest.raises(OSError, match="disk full"):
        train(_cfg(manifest, out, "trainer.steps=3"))
    assert not (out / INFO_FILE).exists() and not list(out.glob("_tmp-*"))
    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", real)
    done = train(_cfg(manifest, out, "trainer.steps=3"))
    assert json.loads((done / INFO_FILE).read_text())["steps"] == 3 and (done / MANIFEST_FILE).is_file()


@pytest.mark.parametrize("override,key", [("arch.text_hidden=33", "arch.text_hidden must be an even width"),
                                          ("arch.text_layers=0", "arch.text_layers"),
                                          ("arch.max_length=2", "arch.max_length"),
                                          ("arch.num_train_timesteps=1", "arch.num_train_timesteps")])
def test_arch_settings_the_encoder_or_schedule_cannot_take_are_named_before_any_data(manifest, tmp_path,
                                                                                     override, key):
    """These failed in transformers' CLIP (a width its 2 heads cannot split) or diffusers after every image
    was decoded, leaving _tokenizer/ in the output folder; now the config names the key."""
    with pytest.raises(ConfigError, match=key):
        _cfg(manifest, tmp_path / "o", override)
    assert not (tmp_path / "o").exists()


def test_training_draws_each_image_as_often_as_its_copies(manifest, tmp_path, monkeypatch):
    """Every recall claim rests on the duplication schedule being what the model saw: the draws of a
    short run, recorded, give the image with 8 copies ~8 / 13 of them (13 examples: 8 + 5 singles)
    and each single ~1 / 13. Which image gets the copies follows data.duplication_seed."""
    import numpy as np

    import memex.training as training

    drawn = []
    real = training.draw_rows
    monkeypatch.setattr(training, "draw_rows", lambda *a: drawn.append(real(*a)) or drawn[-1])
    out = train(_cfg(manifest, tmp_path / "m", "trainer.steps=60", "trainer.batch_size=8",
                     "data.duplication=[{copies: 8, count: 1}]", "trainer.checkpoint_every=60"))
    used = pq.read_table(out / MANIFEST_FILE)
    (dup,) = {s for s, c in zip(used["source_id"].to_pylist(), used["copies"].to_pylist()) if c == 8}
    order = [f"i{k}" for k in range(6)]  # the distinct images in manifest order: draw_rows' rows index them
    counts = np.bincount(torch.cat(drawn).numpy(), minlength=6) / (60 * 8)
    assert abs(counts[order.index(dup)] - 8 / 13) < 0.08, counts
    assert all(abs(c - 1 / 13) < 0.05 for k, c in enumerate(counts) if k != order.index(dup)), counts
    other = train(_cfg(manifest, tmp_path / "s", "trainer.steps=2", "data.duplication=[{copies: 8, count: 1}]",
                       "data.duplication_seed=5"))
    t2 = pq.read_table(other / MANIFEST_FILE)
    assert {s for s, c in zip(t2["source_id"].to_pylist(), t2["copies"].to_pylist()) if c == 8} != {dup}


def _files(folder):
    return sorted((p.relative_to(folder), p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
                  if p.is_file())


def test_an_output_holding_a_model_memex_did_not_write_is_refused_untouched(manifest, tmp_path, monkeypatch):
    """`output=` at a diffusers folder memex train did not write (a downloaded model, a typo) was trained into,
    and the final save overwrote its unet/, scheduler/ and model_index.json: only a folder that also held
    memex_train.json was refused. Refused now, naming output and the fix, with nothing in it changed; also
    beside checkpoints of another run, or of this one at another step. A run killed while saving its model
    (model_index.json written, memex_train.json not, its checkpoint at trainer.steps) still finishes."""
    from diffusers import DiffusionPipeline

    from memex import tiny

    theirs = tiny.build("latent_text", tmp_path / "sd")
    refused = re.escape(f"output={theirs} holds a diffusers model (model_index.json) that memex train did not "
                        f"write (it has no {INFO_FILE})") + ".*Choose another output folder"
    before = _files(theirs)
    for arch in ("text_small", "uncond_small"):
        with pytest.raises(ConfigError, match=refused):
            train(_cfg(manifest, theirs, f"arch={arch}"))
    assert _files(theirs) == before
    # checkpoints of another run beside it (output at a folder memex trained in before): another recipe at
    # trainer.steps, or this recipe at another step
    other = train(_cfg(manifest, tmp_path / "other", "trainer.steps=3"))
    shutil.copytree(other / "checkpoints", theirs / "checkpoints")
    before = _files(theirs)
    for extra in (["trainer.steps=3", "trainer.lr=5e-4"], ["trainer.steps=6"]):
        with pytest.raises(ConfigError, match=refused):
            train(_cfg(manifest, theirs, *extra))
    assert _files(theirs) == before

    out = tmp_path / "m"
    real = DiffusionPipeline.save_pretrained

    def dies_after_writing(self, *a, **k):
        real(self, *a, **k)
        raise OSError("killed after the pipeline was saved (simulated)")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", dies_after_writing)
    with pytest.raises(OSError, match="killed after"):
        train(_cfg(manifest, out, "trainer.steps=3"))
    assert (out / "model_index.json").is_file() and not (out / INFO_FILE).exists()
    monkeypatch.undo()
    done = train(_cfg(manifest, out, "trainer.steps=3"))
    info = json.loads((done / INFO_FILE).read_text())
    assert info["steps"] == 3 and info["resumed_from"] == 3


def test_a_schedule_too_short_to_reach_noise_is_refused_before_any_data(manifest, tmp_path):
    """DDPM's linear betas run 1e-4..0.02 whatever arch.num_train_timesteps is, so few timesteps leave the image
    in x_T (alphas_cumprod[-1] 0.36 at 100, 0.08 at 250): sampling from pure noise starts off what the model
    learned. Refused before the data is read (data.path here does not exist), naming the fewest timesteps
    that leave <= 0.01; at that number the saved scheduler is the one trained with, unchanged."""
    from diffusers import DDPMScheduler

    assert float(DDPMScheduler(num_train_timesteps=455).alphas_cumprod[-1]) > 0.01 >= \
        float(DDPMScheduler(num_train_timesteps=456).alphas_cumprod[-1])
    for steps, left in ((100, "0.364"), (250, "0.080"), (455, "0.010")):
        with pytest.raises(ConfigError, match=re.escape(f"arch.num_train_timesteps={steps} leaves {left} of the "
                                                        "image's signal") + ".*"
                           + re.escape("Set arch.num_train_timesteps >= 456")):
            train(_cfg(tmp_path / "missing.parquet", tmp_path / "o", f"arch.num_train_timesteps={steps}"))
        assert not (tmp_path / "o").exists()
    out = train(_cfg(manifest, tmp_path / "m", "arch=uncond_small", "arch.num_train_timesteps=456",
                     "trainer.steps=1"))
    saved = DDPMScheduler.from_pretrained(out / "scheduler")
    assert saved.config.num_train_timesteps == 456 and saved.config.beta_end == 0.02
    assert float(saved.alphas_cumprod[-1]) <= 0.01
    # LiRA's shadows copy a target's recipe as it was trained (memex mia): one trained at 250 before this
    # check existed still gets its shadows, with the target's schedule
    out = train(_cfg(manifest, tmp_path / "shadow", "arch=uncond_small", "arch.num_train_timesteps=250",
                     "trainer.steps=1"), copies_recipe=True)
    assert DDPMScheduler.from_pretrained(out / "scheduler").config.num_train_timesteps == 250


def test_a_caption_column_of_class_labels_is_refused(tmp_path):
    """data.caption_column=label on a CIFAR-style manifest (integer class labels) with a text model: label 0
    trained as the empty (unconditional) caption and label 1 raised a bare "'int' object is not iterable".
    Refused naming the column, the type and the fix, and nothing is left in output."""
    rows = [logo(i, 16) for i in range(4)]
    path = tmp_path / "cifar.parquet"
    pq.write_table(pa.table({"id": [f"i{k}" for k in range(4)], "image": [encode_png(im) for im, _ in rows],
                             "label": [0, 1, 2, 3]}), path)
    with pytest.raises(ConfigError, match=re.escape("data.caption_column='label' holds int values, not caption text "
                                                    "(image 'i0': 0)") + ".*map class labels to their names"):
        train(_cfg(path, tmp_path / "out", "data.caption_column=label", "data.duplication=[]"))
    assert not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_text_encoder_is_named_and_leaves_nothing_behind(manifest, tmp_path):
    """A text model's checkpoint holds its frozen encoder (text_encoder/). Truncated weights or a missing
    config.json there raised safetensors' or transformers' traceback, outside the damaged-checkpoint message,
    and left _tokenizer/ in output; now the same one line as the UNet's, naming the checkpoint to resume from."""
    out = tmp_path / "m"
    train(_cfg(manifest, out, "trainer.steps=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2"))
    _killed_before_the_final_save(out)
    ck = out / "checkpoints" / "checkpoint-4"
    weights, conf = ck / "text_encoder" / "model.safetensors", ck / "text_encoder" / "config.json"
    good = {p: p.read_bytes() for p in (weights, conf)}
    for path, data in ((weights, good[weights][:1000]), (conf, None)):
        path.unlink() if data is None else path.write_bytes(data)
        with pytest.raises(ConfigError, match=re.escape(f"{ck} is damaged or incomplete (") + ".*"
                           + re.escape("Delete that folder and rerun to resume from checkpoint-2")):
            train(_cfg(manifest, out, "trainer.steps=4", "trainer.checkpoint_every=2"))
        assert not (out / "_tokenizer").exists()
        path.write_bytes(good[path])
