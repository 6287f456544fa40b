"""memex nightly's discovery and plan on the layouts trainers leave behind: a final model saved with its last
checkpoint's weights (diffusers' scripts, kohya's sd-scripts), an EMA run with one checkpoint lacking
unet_ema/, a checkpoint rotated away while its run folder is listed, and checkpoint-<step>-<suffix>/ exports.
Plan mode only: no audit runs."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from memex.checkpoints import discover
from memex.stages import nightly

from conftest import REPO, SMALL_AUDIT, compose, make_lora

DEMO_RUN = REPO / "demo" / "checkpoints" / "demo-text-run"
BASE = REPO / "demo" / "models" / "demo-text"


def _plan(tmp: Path, *extra: str) -> nightly.NightlyResult:
    cfg = compose([f"nightly.location={tmp / 'watch'}", f"storage.root={tmp / 'runs'}", "resources.executor=local",
                   *SMALL_AUDIT, f"nightly.base_model={BASE}", "nightly.action=plan", *extra], config_name="nightly")
    return nightly.plan(cfg)


def _pending(res: nightly.NightlyResult, tmp: Path) -> list[str]:
    return [os.path.relpath(p.ckpt.location, tmp / "watch") for p in res.pending]


def test_a_final_pipeline_holding_the_last_checkpoints_unet_is_planned_once(tmp_path, caplog):
    """train_text_to_image.py saves checkpoint-<last step>/unet and then the final pipeline in output_dir with
    that very UNet (the same bytes) on the frozen VAE and text encoder. Both were audited (two rows at one
    step, the gate comparing the model with itself; plan mode ran both jobs at once): their weights hashes
    differ, one naming base/unet/, the other unet/. Now the final pipeline is left out, with a line naming
    the checkpoint audited for it; one with other weights is still audited."""
    out = tmp_path / "watch" / "sd-model-finetuned"
    for step in (1000, 2000):
        shutil.copytree(DEMO_RUN / f"checkpoint-{step}" / "unet", out / f"checkpoint-{step}" / "unet")
    shutil.copytree(BASE, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet", "memex_train.json"))
    shutil.copytree(out / "checkpoint-2000" / "unet", out / "unet")  # the final pipeline's UNet: the last step's
    with caplog.at_level(logging.INFO, logger="memex.nightly"):
        res = _plan(tmp_path)
    assert _pending(res, tmp_path) == ["sd-model-finetuned/checkpoint-1000", "sd-model-finetuned/checkpoint-2000"]
    assert "sd-model-finetuned: left out, it holds the weights of" in caplog.text and "checkpoint-2000" in caplog.text
    # a job for the final model alone (nightly.only) leaves it out too
    assert _plan(tmp_path, f"nightly.only={out}").pending == []
    # a final pipeline with a UNet of its own (trained on past the last checkpoint) is audited
    shutil.rmtree(out / "unet")
    shutil.copytree(DEMO_RUN / "checkpoint-3000" / "unet", out / "unet")
    assert _pending(_plan(tmp_path), tmp_path)[-1] == "sd-model-finetuned"


def test_a_final_lora_equal_to_the_last_checkpoint_is_planned_once(tmp_path):
    """diffusers' *_lora.py scripts save checkpoint-<last step>/pytorch_lora_weights.safetensors and then the
    same file in output_dir: plan mode listed both, two jobs audited one LoRA at once."""
    out = tmp_path / "watch" / "sd-lora"
    for seed, step in enumerate((500, 1000), start=1):
        make_lora(str(BASE), out / f"checkpoint-{step}", seed=seed)
    shutil.copy(out / "checkpoint-1000" / "pytorch_lora_weights.safetensors", out / "pytorch_lora_weights.safetensors")
    res = _plan(tmp_path)
    assert _pending(res, tmp_path) == ["sd-lora/checkpoint-500", "sd-lora/checkpoint-1000"]
    assert len({p.weights for p in res.pending}) == 2


def test_kohyas_final_lora_with_the_last_steps_tensors_is_planned_once(tmp_path):
    """sd-scripts' train_network.py saves <name>-step<N>.safetensors at its last step and then <name>.safetensors:
    the same tensors, each file's metadata stamped with its own ss_training_finished_at. Both were audited at
    step N. Compared by their tensors, the final file is left out; a final one with other tensors is not."""
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "watch" / "kohya-out"
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"

    def net():
        return {f"{key}.lora_down.weight": torch.randn(4, 32, generator=g),
                f"{key}.lora_up.weight": torch.randn(32, 4, generator=g), f"{key}.alpha": torch.tensor(4.0)}

    def save(tensors, name, steps):
        save_file(tensors, str(out / name), {"ss_output_name": "mylora", "ss_network_module": "networks.lora",
                                             "ss_steps": steps, "ss_training_finished_at": str(time.time())})

    save(net(), "mylora-step00000500.safetensors", "500")
    last = net()
    save(last, "mylora-step00001000.safetensors", "1000")
    save(last, "mylora.safetensors", "1000")
    assert (out / "mylora.safetensors").read_bytes() != (out / "mylora-step00001000.safetensors").read_bytes()
    assert _pending(_plan(tmp_path), tmp_path) == ["kohya-out/mylora-step00000500.safetensors",
                                                   "kohya-out/mylora-step00001000.safetensors"]
    save(net(), "mylora.safetensors", "1000")  # other tensors: audited
    assert _pending(_plan(tmp_path), tmp_path)[-1] == "kohya-out/mylora.safetensors"


def test_an_ema_runs_checkpoint_without_unet_ema_is_left_out_not_the_night(tmp_path, caplog):
    """nightly.ema=true on a train_text_to_image --use_ema run where one checkpoint-<step>/ has unet/ and no
    unet_ema/ (a crash cut it short, a copy has not brought it yet) stopped the whole night, naming that run as
    trained without --use_ema. Now that checkpoint is left out with a warning naming it, the rest audited; a run
    with no unet_ema/ at all still fails, as before."""
    run = tmp_path / "watch" / "sd-ema-run"
    for step in (1000, 2000, 3000):
        shutil.copytree(DEMO_RUN / f"checkpoint-{step}" / "unet", run / f"checkpoint-{step}" / "unet")
        if step != 3000:
            shutil.copytree(DEMO_RUN / f"checkpoint-{step}" / "unet", run / f"checkpoint-{step}" / "unet_ema")
    with caplog.at_level(logging.WARNING, logger="memex"):
        res = _plan(tmp_path, "nightly.ema=true")
    assert [p.ckpt.unet for p in res.pending] == [str(run / f"checkpoint-{s}" / "unet_ema") for s in (1000, 2000)]
    assert "1 checkpoint(s) of an EMA run left out" in caplog.text and str(run / "checkpoint-3000") in caplog.text
    shutil.copytree(DEMO_RUN / "checkpoint-1000", tmp_path / "watch" / "raw-run" / "checkpoint-1000")
    with pytest.raises(nightly.MemexError, match=r"1 checkpoint\(s\) .* have unet/ only \(e.g. .*raw-run/checkpoint"
                                                 r"-1000\): that run was trained without --use_ema"):
        discover(str(tmp_path / "watch"), str(BASE), ema=True)


def test_a_checkpoint_rotated_away_while_its_run_is_listed_leaves_the_rest_found(tmp_path, monkeypatch, caplog):
    """checkpoints_total_limit: the trainer deletes its oldest checkpoint-<step>/ while the night lists the run.
    The whole run folder was skipped ("removed while it was read"), and with nothing else found the night failed
    naming the run's other checkpoints as weights memex does not read. Now only the deleted checkpoint is
    skipped, with a warning; and a walk that found nothing because checkpoints vanished fails no night."""
    run = tmp_path / "watch" / "sd-run"
    for step in (1000, 2000, 3000):
        shutil.copytree(DEMO_RUN / f"checkpoint-{step}", run / f"checkpoint-{step}")
    victim = run / "checkpoint-1000" / "unet"
    listdir = Path.iterdir

    def racing(self):  # the rotation, between discovery's (child / "unet").is_dir() and its listing
        if self == victim and victim.exists():
            shutil.rmtree(victim.parent if (run / "checkpoint-2000").exists() else victim)
        return listdir(self)

    monkeypatch.setattr(Path, "iterdir", racing)
    with caplog.at_level(logging.WARNING, logger="memex"):
        found = discover(str(tmp_path / "watch"), str(BASE))
    assert [c.location for c in found] == [str(run / f"checkpoint-{s}") for s in (2000, 3000)]
    assert f"skipped {run / 'checkpoint-1000'}: removed while it was read" in caplog.text
    # the run's last checkpoint rotated away part-way (its unet/ gone, unet_ema/ not yet): nothing found, no failure
    shutil.rmtree(run / "checkpoint-2000")
    shutil.rmtree(run / "checkpoint-3000")
    shutil.copytree(DEMO_RUN / "checkpoint-1000" / "unet", run / "checkpoint-1000" / "unet")
    shutil.copytree(DEMO_RUN / "checkpoint-1000" / "unet", run / "checkpoint-1000" / "unet_ema")
    assert discover(str(tmp_path / "watch"), str(BASE)) == []


def test_a_checkpoint_step_suffix_folder_is_its_own_series_at_its_step(tmp_path):
    """checkpoint-1000-ema/ (a user's export of that step's EMA weights, beside checkpoint-1000/) was read as a
    step-less final model of the raw series: gated against checkpoint-2000, logged after every step. It is now a
    series of its own, <run>/<run>-ema, at its step: EMA weights gated against EMA weights, in order. A UNet-only
    checkpoint-2000-ema/unet, which was not found at all, is one too."""
    exports = tmp_path / "watch" / "exports"
    for step in (1000, 2000):
        for suffix in ("", "-ema"):
            shutil.copytree(BASE, exports / f"checkpoint-{step}{suffix}", ignore=shutil.ignore_patterns("memex_*"))
    run = tmp_path / "watch" / "unet-run"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", run / "checkpoint-2000")
    shutil.copytree(DEMO_RUN / "checkpoint-2000", run / "checkpoint-2000-ema")
    found = discover(str(tmp_path / "watch"), str(BASE))
    assert [(os.path.relpath(c.location, exports.parent), os.path.relpath(c.series, exports.parent), c.step)
            for c in found] == [
        ("exports/checkpoint-1000", "exports", 1000), ("exports/checkpoint-2000", "exports", 2000),
        ("exports/checkpoint-1000-ema", "exports/exports-ema", 1000),
        ("exports/checkpoint-2000-ema", "exports/exports-ema", 2000),
        ("unet-run/checkpoint-2000", "unet-run", 2000),
        ("unet-run/checkpoint-2000-ema", "unet-run/unet-run-ema", 2000)]
    assert found[-1].unet == str(run / "checkpoint-2000-ema" / "unet")
