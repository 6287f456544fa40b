"""Inputs checked before any cluster work (memex.models.check_model_inputs, audit.check_trainset).

Each test breaks one thing in a copy of a tiny diffusers folder (memex/tiny.py) or in the audit's
inputs, and expects a one-line user error that names the file or key, raised before the index is
built. No Ray head: the checks come before Ray starts, which is the point.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from memex.config import ConfigError, MemexError
from memex.images import encode_png
from memex.models import ModelError, check_model_inputs, load_model
from memex.prompts import PromptError

from conftest import BIN, REPO, compose

UNET_ST = Path("unet") / "diffusion_pytorch_model.safetensors"


def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def _to_pickle(component: Path, st_name: str, bin_name: str) -> Path:
    """Replace a component's safetensors with the same tensors pickled (what old checkpoints ship)."""
    sd = load_file(component / st_name)
    torch.save(sd, component / bin_name)
    os.remove(component / st_name)
    return component / bin_name


class _Payload:
    """Unpickled by plain pickle, this makes a folder: the code execution weights_only prevents."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ---- safetensors headers --------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.5, 100])
def test_truncated_unet_is_named(tiny_models, tmp_path, keep):
    path = _copy(tiny_models["unconditional"], tmp_path / "m")
    w = path / UNET_ST
    with open(w, "r+b") as f:
        f.truncate(int(w.stat().st_size * keep) if keep < 1 else keep)
    with pytest.raises(ModelError, match=r"unet/diffusion_pytorch_model\.safetensors is truncated"):
        check_model_inputs(str(path))
    with pytest.raises(ModelError, match="is truncated"):  # the load in an actor says the same
        load_model(str(path))


def test_random_bytes_are_not_a_safetensors_file(tiny_models, tmp_path):
    path = _copy(tiny_models["latent_text"], tmp_path / "m")
    w = path / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(np.random.default_rng(0).bytes(w.stat().st_size))
    with pytest.raises(ModelError, match=r"vae/diffusion_pytorch_model\.safetensors is not a safetensors file"):
        check_model_inputs(str(path))


def test_json_garbage_header_is_refused(tiny_models, tmp_path):
    path = _copy(tiny_models["unconditional"], tmp_path / "m")
    (path / UNET_ST).write_bytes((20).to_bytes(8, "little") + b"\xff" * 20 + b"\0" * 64)
    with pytest.raises(ModelError, match="is not a safetensors file .*unreadable header"):
        check_model_inputs(str(path))


# ---- shapes against config.json --------------------------------------------------------------
def test_tensor_of_the_wrong_shape_is_named(tiny_models, tmp_path):
    path = _copy(tiny_models["unconditional"], tmp_path / "m")
    sd = load_file(path / UNET_ST)
    sd["conv_in.weight"] = sd["conv_in.weight"].flatten(1).contiguous()  # (16, 3, 3, 3) -> (16, 27)
    save_file(sd, path / UNET_ST, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"tensor 'conv_in.weight' in .*unet.* has shape \[16, 27\] but .*config.json "
                                         r"makes a UNet2DModel that needs \[16, 3, 3, 3\]"):
        check_model_inputs(str(path))


def test_text_encoder_shapes_are_checked_too(tiny_models, tmp_path):
    """The transformers side: a CLIPTextModel built from its config on `meta`."""
    path = _copy(tiny_models["latent_text"], tmp_path / "m")
    w = path / "text_encoder" / "model.safetensors"
    sd = load_file(w)
    key = next(k for k in sd if k.endswith("token_embedding.weight"))
    sd[key] = sd[key][:-1].contiguous()  # one token fewer than the config's vocab_size
    save_file(sd, w, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=rf"tensor '{re.escape(key)}' in .*text_encoder/model\.safetensors has shape "
                                         r".* makes a CLIPTextModel that needs"):
        check_model_inputs(str(path))


def test_config_of_another_model_is_caught(tiny_models, tmp_path):
    """Weights and config.json from different models: the shapes disagree before any weight is read."""
    import json

    path = _copy(tiny_models["unconditional"], tmp_path / "m")
    cfg = json.loads((path / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [16, 64]
    (path / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="are from different models"):
        check_model_inputs(str(path))


def test_good_models_pass_and_sharded_weights_are_read_shard_by_shard(tiny_models, tmp_path):
    from diffusers import UNet2DModel

    for kind in ("unconditional", "latent_text", "pixel_text"):
        check_model_inputs(tiny_models[kind])
    path = _copy(tiny_models["unconditional"], tmp_path / "m")
    UNet2DModel.from_pretrained(path / "unet").save_pretrained(path / "unet", max_shard_size="200KB")
    os.remove(path / UNET_ST)
    shards = sorted((path / "unet").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    check_model_inputs(str(path))
    with open(shards[-1], "r+b") as f:
        f.truncate(shards[-1].stat().st_size - 1)
    with pytest.raises(ModelError, match=rf"{shards[-1].name} is truncated"):
        check_model_inputs(str(path))
    shards[-1].unlink()
    with pytest.raises(ModelError, match="lists shards that are missing"):
        check_model_inputs(str(path))


# ---- the checkpoint-<step>/unet layout (nightly) ---------------------------------------------
def test_unet_override_is_checked_and_replaces_the_bases_unet(tiny_models, tmp_path):
    base = _copy(tiny_models["unconditional"], tmp_path / "base")
    ckpt = _copy(base / "unet", tmp_path / "run" / "checkpoint-100" / "unet")
    (base / UNET_ST).write_bytes(b"never read: the override replaces it")
    check_model_inputs(str(base), str(ckpt))
    with open(ckpt / "diffusion_pytorch_model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelError, match=r"checkpoint-100/unet/diffusion_pytorch_model\.safetensors is truncated"):
        check_model_inputs(str(base), str(ckpt))
    shutil.rmtree(ckpt)
    _to_pickle(_copy(Path(tiny_models["unconditional"]) / "unet", ckpt), "diffusion_pytorch_model.safetensors",
               "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match=r"model\.unet=.*checkpoint-100/unet: .* has only pickle weights"):
        check_model_inputs(str(base), str(ckpt))
    with pytest.raises(ModelError, match=r"model\.unet=.*checkpoint-200/unet: no such folder"):  # was "no config.json"
        check_model_inputs(str(base), str(tmp_path / "run" / "checkpoint-200" / "unet"))


# ---- pickle-only checkpoints -------------------------------------------------------------------
def test_pickle_only_is_refused_naming_the_opt_in(tiny_models, tmp_path):
    path = _copy(tiny_models["latent_text"], tmp_path / "m")
    _to_pickle(path / "unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match=r"unet has only pickle weights \(diffusion_pytorch_model\.bin\).*"
                                         r"set model\.allow_pickle=true"):
        check_model_inputs(str(path))
    with pytest.raises(ModelError, match=r"model\.allow_pickle=true"):
        load_model(str(path))
    # a variant beside it is not what a load without model variants reads: still the .bin
    shutil.copy(Path(tiny_models["latent_text"]) / UNET_ST, path / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(ModelError, match=r"unet has only pickle weights"):
        check_model_inputs(str(path))


def test_pickle_opt_in_loads_the_same_weights(tiny_models, tmp_path):
    path = _copy(tiny_models["latent_text"], tmp_path / "m")
    _to_pickle(path / "unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    _to_pickle(path / "text_encoder", "model.safetensors", "pytorch_model.bin")  # transformers' pickle name
    with pytest.raises(ModelError, match=r"text_encoder has only pickle weights \(pytorch_model\.bin\)"):
        check_model_inputs(str(path), allow_pickle=False, unet=str(tiny_models["latent_text"]) + "/unet")
    check_model_inputs(str(path), allow_pickle=True)
    m, ref = load_model(str(path), allow_pickle=True), load_model(tiny_models["latent_text"])
    for name in ("unet", "text_encoder"):
        a, b = getattr(m.pipe, name).state_dict(), getattr(ref.pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pickle_with_a_payload_is_never_executed(tiny_models, tmp_path):
    """model.allow_pickle=true reads pickles with torch.load(weights_only=True): memex's own check,
    and diffusers' and transformers' loaders (pinned here: an upgrade that drops it fails this)."""
    from diffusers.models.model_loading_utils import load_state_dict as diffusers_load
    from transformers.modeling_utils import load_state_dict as transformers_load

    path = _copy(tiny_models["unconditional"], tmp_path / "m")
    sd = load_file(path / UNET_ST)
    os.remove(path / UNET_ST)
    marker = tmp_path / "pwned"
    sd["conv_in.weight"] = _Payload(str(marker))
    evil = path / "unet" / "diffusion_pytorch_model.bin"
    torch.save(sd, evil)
    with pytest.raises(ModelError, match="allow_pickle"):
        load_model(str(path))
    with pytest.raises(ModelError, match=r"pytorch_model\.bin is refused: its pickle holds more than tensors"):
        load_model(str(path), allow_pickle=True)
    for loader in (diffusers_load, transformers_load):
        with pytest.raises(Exception) as e:  # noqa: B017 - diffusers wraps the refusal in an OSError
            loader(str(evil))
        chain, x = [], e.value  # the refusal itself, not an earlier failure (a renamed argument, a missing file)
        while x is not None:
            chain.append(x)
            x = x.__cause__ or x.__context__
        assert any(isinstance(x, pickle.UnpicklingError) and "Weights only load failed" in str(x) for x in chain), \
            f"{loader.__module__}: {chain}"
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.is_dir()


# ---- hub ids ------------------------------------------------------------------------------------
def test_hub_id_is_checked_on_its_cached_snapshot_else_deferred(tiny_models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    check_model_inputs("some-org/not-cached")  # no snapshot: deferred to the load, no error, no network
    repo = tmp_path / "hub" / "models--some-org--tiny"
    sha = "0" * 40
    snap = _copy(tiny_models["unconditional"], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    check_model_inputs("some-org/tiny")
    with open(snap / UNET_ST, "r+b") as f:
        f.truncate(500)
    with pytest.raises(ModelError, match=rf"snapshots/{sha}/unet/diffusion_pytorch_model\.safetensors is truncated"):
        check_model_inputs("some-org/tiny")


def test_a_file_where_a_model_folder_belongs_is_named_with_its_fix(tiny_models, tmp_path, monkeypatch):
    """A single-file checkpoint (the original Stable Diffusion layout that A1111, ComfyUI and kohya
    save) given as model.path was "no such folder" when absolute and, when relative (models/x.safetensors
    has a hub id's shape), was deferred to the load as a hub id: every actor failed after the run folder
    was claimed. A pipeline's own files, a UNet's weights file and a LoRA are other likely slips."""
    from memex.checkpoints import check_base_model

    from conftest import make_lora

    (tmp_path / "models").mkdir()
    single = tmp_path / "models" / "v1-5-pruned-emaonly.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, single)
    monkeypatch.chdir(tmp_path)
    for given in (str(single), "models/v1-5-pruned-emaonly.safetensors"):
        with pytest.raises(ModelError, match=rf"model\.path={re.escape(given)} is a single-file checkpoint .*"
                                             r"from_single_file\('.*v1-5-pruned-emaonly\.safetensors'\)"
                                             r"\.save_pretrained\('.*v1-5-pruned-emaonly-diffusers'\)"):
            check_model_inputs(given)
    with pytest.raises(ModelError, match=r"nightly\.base_model=.*v1-5-pruned-emaonly\.safetensors is a "
                                         r"single-file checkpoint.* and set nightly\.base_model=.*-diffusers "
                                         r"\(from_single_file"):
        check_base_model(str(single))
    base = tiny_models["latent_text"]
    lora = make_lora(base, tmp_path / "lora") / "pytorch_lora_weights.safetensors"
    with pytest.raises(ModelError, match=rf"model\.path={re.escape(str(lora))} is a LoRA file: set model\.lora="):
        check_model_inputs(str(lora))
    for part in ("model_index.json", UNET_ST, Path("unet") / "config.json"):
        with pytest.raises(ModelError, match=rf"is a file of one, not the folder: set model\.path={re.escape(base)}$"):
            check_model_inputs(str(Path(base) / part))
    unet_file = str(Path(base) / UNET_ST)
    with pytest.raises(ModelError, match=rf"model\.unet=.* is a file of one, not the folder: set "
                                         rf"model\.unet={re.escape(str(Path(base) / 'unet'))}$"):
        check_model_inputs(base, unet=unet_file)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ModelError, match=r"notes\.txt is a file, not a diffusers pipeline folder"):
        check_model_inputs(str(other))


def test_a_fine_tuned_text_encoder_replaces_the_bases(tiny_models, tmp_path):
    """model.text_encoder: diffusers' DreamBooth with --train_text_encoder saves checkpoint-<step>/
    text_encoder beside unet/; with the base's text encoder an audit sampled another model. The
    override is loaded in the base's place (its weights, not the base's), changes the samples, joins
    the run identity only when set, and is refused naming the key when it cannot be the base's."""
    from transformers import CLIPTextModel

    from memex.config import ModelConfig, SamplingConfig, model_identity
    from memex.sampling import Sampler

    base = tiny_models["latent_text"]
    te = CLIPTextModel.from_pretrained(str(Path(base) / "text_encoder"))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in te.parameters():
            p.add_(0.2 * torch.randn_like(p))
    te.save_pretrained(tmp_path / "text_encoder")
    loaded = load_model(base, text_encoder=str(tmp_path / "text_encoder"))
    ours, saved = loaded.pipe.text_encoder.state_dict(), te.state_dict()
    assert all(torch.equal(ours[k], saved[k]) for k in saved) and loaded.model_id.endswith(
        f"+text_encoder={tmp_path / 'text_encoder'}")
    settings = SamplingConfig(num_inference_steps=2, batch_size=2)
    args = (["p", "p"], ["a red logo"] * 2, [1, 2])
    plain = Sampler(load_model(base), settings).generate(*args)
    assert not np.array_equal(Sampler(loaded, settings).generate(*args), plain)
    assert "text_encoder" not in model_identity(ModelConfig(path=base))
    assert model_identity(ModelConfig(path=base, text_encoder="/te"))["text_encoder"] == "/te"

    bad = _copy(tmp_path / "text_encoder", tmp_path / "t5")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["T5EncoderModel"]}))
    trunc = _copy(tmp_path / "text_encoder", tmp_path / "trunc")
    (trunc / "model.safetensors").write_bytes((tmp_path / "text_encoder" / "model.safetensors").read_bytes()[:4000])
    for given, on, match in [
            (tmp_path / "nowhere", base, r"model\.text_encoder=.*nowhere: no such folder"),
            (tmp_path / "text_encoder" / "model.safetensors", base,
             rf"is a file of one, not the folder: set model\.text_encoder={re.escape(str(tmp_path))}/text_encoder$"),
            (bad, base, r"holds a T5EncoderModel, but the base's text encoder is a CLIPTextModel"),
            (trunc, base, r"model\.text_encoder=.*trunc: .*model\.safetensors is truncated"),
            (tmp_path / "text_encoder", tiny_models["unconditional"], r"the base model\.path has no text encoder")]:
        with pytest.raises(ModelError, match=match):
            check_model_inputs(on, text_encoder=str(given))


@pytest.fixture
def fake_hub(monkeypatch):
    """The hub's model-info API (GET /api/models/<id>[/revision/<rev>]) served on loopback, answering
    as huggingface.co does: 401 + X-Error-Code RepoNotFound for a missing repo, 404 + RevisionNotFound."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import huggingface_hub.constants

    repos = {"org/pipe": {"siblings": ["model_index.json", "unet/config.json"]},
             "org/single": {"siblings": ["README.md", "v1-5-pruned-emaonly.safetensors"]},
             "org/gated": {"siblings": ["model_index.json"], "gated": "auto"}}
    asked: list[str] = []

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            asked.append(self.path)
            m = re.match(r"/api/models/([^/]+/[^/?]+)(?:/revision/([^/?]+))?", self.path)
            repo = repos.get(m.group(1)) if m else None
            if repo is None or (m.group(2) not in (None, "main")):
                self.send_response(401 if repo is None else 404)
                self.send_header("X-Error-Code", "RepoNotFound" if repo is None else "RevisionNotFound")
                self.end_headers()
                return
            body = json.dumps({"id": m.group(1), "gated": repo.get("gated", False),
                               "siblings": [{"rfilename": f} for f in repo["siblings"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.devnull + "-no-cache")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    yield asked
    server.shutdown()


def test_a_hub_id_not_cached_here_is_asked_of_the_hub(fake_hub, tiny_models, tmp_path, monkeypatch):
    """A hub id with no snapshot here used to be left to the load: a typo, a model since removed from
    the hub or a repo that is no pipeline failed in every actor after the index build. One metadata
    request now names it first; where the hub cannot answer, the load still decides."""
    import huggingface_hub.constants

    from memex.checkpoints import check_base_model

    assert check_model_inputs("org/pipe") is None  # a pipeline: its weights are checked when loaded
    with pytest.raises(ModelError, match=r"model\.path=org/missing: no such folder here, and the hub has no model "
                                         r"org/missing \(a private one needs HF_TOKEN\)$"):
        check_model_inputs("org/missing")
    with pytest.raises(ModelError, match=r"nightly\.base_model=org/missing: no such folder here"):
        check_base_model("org/missing")
    _copy(tiny_models["latent_text"], tmp_path / "models" / "demo-text")  # a mistyped local path
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"models/ is a folder here: did you mean models/demo-text\?"):
        check_model_inputs("models/dem-text")
    with pytest.raises(ModelError, match=r"model\.revision=v2: the hub model org/pipe .* has no such branch"):
        check_model_inputs("org/pipe", revision="v2")
    with pytest.raises(ModelError, match=r"org/single: the hub model has no model_index\.json.*"
                                         r"v1-5-pruned-emaonly\.safetensors is a single-file checkpoint"):
        check_model_inputs("org/single")
    with pytest.raises(ModelError, match=r"org/gated is gated on the hub: .* set HF_TOKEN"):
        check_model_inputs("org/gated")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_x")
    check_model_inputs("org/gated")
    asked = len(fake_hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # offline: no request, the load decides
    check_model_inputs("org/missing")
    assert len(fake_hub) == asked
    with pytest.raises(ModelError, match=r"models/dem-text: no such folder; models/ is a folder here: did you mean "
                                         r"models/demo-text\? \(nor a hub id with a snapshot here\)"):
        check_model_inputs("models/dem-text")  # whether the hub answers or not
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    from conftest import free_port

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # unreachable
    check_model_inputs("org/missing")


# ---- the audit: everything above, plus the training set and prompts, before the index -------------
@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    manifest = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "image": [encode_png(rng.integers(0, 256, (8, 8, 3), np.uint8))
                                                         for _ in range(2)], "caption": ["x", "y"]}), manifest)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a logo\n")
    return manifest, prompts


def _audit_cfg(tmp_path, model, manifest, prompts, *extra):
    return compose(["model=local", f"model.path={model}", "trainset=manifest", f"trainset.path={manifest}",
                    "prompts=file", f"prompts.path={prompts}", f"storage.root={tmp_path / 'runs'}",
                    "resources.address=127.0.0.1:1", *extra], config_name="audit")


class _IndexStarted(Exception):
    pass


@pytest.fixture
def no_index(monkeypatch):
    """index.run (the first cluster work) raises: an error raised before it is a preflight error."""
    from memex.stages import index

    def refuse(cfg, **kw):
        raise _IndexStarted

    monkeypatch.setattr(index, "run", refuse)


def _bad(tmp_path, tiny_models) -> Path:
    path = _copy(tiny_models["pixel_text"], tmp_path / "bad")
    with open(path / UNET_ST, "r+b") as f:
        f.truncate(4096)
    return path


def test_audit_refuses_a_bad_model_before_the_index(tiny_models, tmp_path, inputs, no_index):
    from memex.stages import audit

    with pytest.raises(ModelError, match="is truncated"):
        audit.run(_audit_cfg(tmp_path, _bad(tmp_path, tiny_models), *inputs))
    assert not (tmp_path / "runs" / "_index").exists()
    with pytest.raises(_IndexStarted):  # the same inputs with a sound model get as far as the index
        audit.run(_audit_cfg(tmp_path, tiny_models["pixel_text"], *inputs))


@pytest.mark.parametrize("case, message", [
    ("missing", r"trainset\.path=.*nowhere: no such file or folder"),
    ("empty_folder", r"trainset\.path=.*empty: the folder holds no images"),
    ("not_parquet", r"trainset\.path=.*train\.csv is a file but not a \.parquet manifest"),
    ("bad_parquet", r"trainset\.path=.*bad\.parquet: .* is not readable Parquet"),
    ("no_id", r"trainset\.path=.*noid\.parquet: the manifest needs an 'id' column"),
])
def test_audit_refuses_an_unreadable_training_set_before_the_index(tiny_models, tmp_path, inputs, no_index,
                                                                    case, message):
    from memex.stages import audit

    _, prompts = inputs
    trainset = {"missing": tmp_path / "nowhere", "empty_folder": tmp_path / "empty",
                "not_parquet": tmp_path / "train.csv", "bad_parquet": tmp_path / "bad.parquet",
                "no_id": tmp_path / "noid.parquet"}[case]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    (tmp_path / "train.csv").write_text("id,uri\n")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"name": ["a"], "image": [b"x"]}), tmp_path / "noid.parquet")
    with pytest.raises(ConfigError, match=message):
        audit.run(_audit_cfg(tmp_path, tiny_models["pixel_text"], trainset, prompts))


def test_audit_ranking_captions_refuses_a_manifest_without_its_caption_column(tiny_models, tmp_path, inputs,
                                                                              no_index):
    """The audit's prompts are the training captions (near-duplicate ranked): a manifest without
    trainset.caption_column was found only after the whole index was built ("the training set has
    no captions"); now before it, naming the key and the columns there are."""
    from memex.stages import audit

    manifest, _ = inputs
    nocap = tmp_path / "nocap.parquet"
    pq.write_table(pq.read_table(manifest).drop(["caption"]), nocap)

    def cfg(path, *extra):
        return compose(["model=local", f"model.path={tiny_models['pixel_text']}", "trainset=manifest",
                        f"trainset.path={path}", f"storage.root={tmp_path / 'runs'}",
                        "resources.address=127.0.0.1:1", *extra], config_name="audit")

    assert cfg(manifest).prompts.source.value == "near_duplicates"
    for path, extra in ((nocap, []), (manifest, ["trainset.caption_column=text"])):
        column = extra[0].split("=")[1] if extra else "caption"
        with pytest.raises(ConfigError, match=rf"the manifest has no '{column}' column \(trainset.caption_column\) "
                                              r"to rank as prompts \(columns: \["):
            audit.run(cfg(path, *extra))
    assert not (tmp_path / "runs").exists()
    with pytest.raises(_IndexStarted):  # prompts of their own: the captions are not needed
        audit.run(cfg(nocap, "prompts=file", f"prompts.path={inputs[1]}"))


@pytest.mark.parametrize("embedder, path, message", [
    ("sscd", "absent.pt", r"absent.pt does not exist: download an SSCD TorchScript file"),
    ("sscd", "junk.pt", r"junk.pt is not a TorchScript model \(not a zip archive"),
    ("clip", "empty", r"empty has no config.json: not a transformers CLIP folder"),
    ("clip", "absent", r"absent is neither an existing local folder nor a hub id"),
])
def test_audit_refuses_a_bad_embedder_path_before_the_index(tiny_models, tmp_path, inputs, no_index, embedder, path,
                                                           message):
    """The index stage loads the embedder only after writing the training table into a new index
    folder (a copy of a manifest's image bytes): a wrong embedder.path is now named before that."""
    from memex.stages import audit

    (tmp_path / "junk.pt").write_bytes(b"not a model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemexError, match=f"embedder.path=.*{message}"):
        audit.run(_audit_cfg(tmp_path, tiny_models["pixel_text"], *inputs, f"embedder={embedder}",
                             f"embedder.path={tmp_path / path}"))
    assert not (tmp_path / "runs").exists()


def test_audit_accepts_an_image_folder_and_refuses_missing_prompts(tiny_models, tmp_path, inputs, no_index):
    from memex.stages import audit

    manifest, _ = inputs
    folder = tmp_path / "images" / "deep"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(_IndexStarted):
        audit.run(_audit_cfg(tmp_path, tiny_models["pixel_text"], tmp_path / "images", tmp_path / "prompts.txt"))
    with pytest.raises(PromptError, match=r"prompts\.path=.*missing\.txt does not exist"):
        audit.run(_audit_cfg(tmp_path, tiny_models["pixel_text"], manifest, tmp_path / "missing.txt"))


@pytest.mark.slow
def test_cli_audit_of_a_truncated_model_fails_in_one_line_before_any_work(tiny_models, tmp_path, inputs):
    manifest, prompts = inputs
    r = subprocess.run([str(BIN / "memex"), "audit", "model=local", f"model.path={_bad(tmp_path, tiny_models)}",
                        "trainset=manifest", f"trainset.path={manifest}", "prompts=file", f"prompts.path={prompts}",
                        f"storage.root={tmp_path / 'runs'}", "resources.address=127.0.0.1:1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("memex: error:")]
    assert len(errors) == 1 and "unet/diffusion_pytorch_model.safetensors is truncated" in errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs" / "_index").exists()


def test_the_folders_model_family_is_checked_before_the_index(tiny_models, tmp_path, inputs, no_index):
    """An unconditional folder audited with prompts (model.kind=auto: the default near-duplicate
    ranked captions, or a prompts file), or a model.kind the folder is not: found by the sampler
    actors, after the whole index was built and a run folder claimed; now from model_index.json
    and the UNet's config.json before any cluster work, in generate and audit alike."""
    from memex.stages import audit, generate

    for kind, model in tiny_models.items():  # what the folder declares is what the loaded pipeline is
        assert check_model_inputs(model).value == kind
    manifest, prompts = inputs
    uncond = tiny_models["unconditional"]
    for extra in ([], ["prompts=file", f"prompts.path={prompts}"]):
        with pytest.raises(ConfigError, match=rf"model.path={re.escape(uncond)} holds an unconditional model, "
                                              r"which takes no prompts: set prompts=none"):
            audit.run(compose(["model=local", f"model.path={uncond}", "trainset=manifest", f"trainset.path={manifest}",
                               f"storage.root={tmp_path / 'runs'}", "resources.address=127.0.0.1:1", *extra],
                              config_name="audit"))
    with pytest.raises(ModelError, match=r"model.kind=latent_text but .* holds a pixel_text model "
                                         r"\(model_index.json\): set model.kind=pixel_text \(or auto\)$"):
        audit.run(_audit_cfg(tmp_path, tiny_models["pixel_text"], manifest, prompts, "model.kind=latent_text"))
    with pytest.raises(ModelError, match=r"holds an unconditional model \(model_index.json\): set "
                                         r"model.kind=unconditional \(or auto\) with prompts=none$"):
        generate.prepare(compose(["model=local", f"model.path={uncond}", "model.kind=pixel_text",
                                  f"storage.root={tmp_path / 'runs'}"]))
    assert not (tmp_path / "runs").exists()
    with pytest.raises(_IndexStarted):  # prompts=none: the same folder passes the check
        audit.run(compose(["model=local", f"model.path={uncond}", "prompts=none", "trainset=manifest",
                           f"trainset.path={manifest}", f"storage.root={tmp_path / 'runs'}",
                           "resources.address=127.0.0.1:1"], config_name="audit"))


# ---- pipelines memex cannot sample: refused from their configs, before any cluster work ------
def _sdxl(folder: Path) -> Path:
    """A tiny real StableDiffusionXLPipeline: two text encoders, a UNet with added conditioning."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from memex.tiny import build_text_encoder, build_tokenizer

    tok, tok2 = build_tokenizer(folder.parent / "tok1"), build_tokenizer(folder.parent / "tok2")
    n, length = len(tok), tok.model_max_length
    torch.manual_seed(0)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=length, projection_dim=32, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1))
    vae = AutoencoderKL(latent_channels=4, norm_num_groups=8, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
                                attention_head_dim=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + 6 * 8)
    StableDiffusionXLPipeline(vae=vae, text_encoder=build_text_encoder(n, length), text_encoder_2=te2, tokenizer=tok,
                              tokenizer_2=tok2, unet=unet, scheduler=EulerDiscreteScheduler()).save_pretrained(folder)
    return folder


def _with_unet(src: str, dst: Path, cls: str, **config) -> Path:
    """A copy of a tiny pipeline whose UNet is rebuilt with `config` changed (weights to match)."""
    import diffusers

    path = _copy(src, dst)
    unet = getattr(diffusers, cls).from_pretrained(path / "unet")
    shutil.rmtree(path / "unet")
    getattr(diffusers, cls).from_config({**unet.config, **config}).save_pretrained(path / "unet")
    return path


def _dit(folder: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, Transformer2DModel

    transformer = Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
                                     num_attention_heads=2, attention_head_dim=8, norm_type="ada_norm_zero",
                                     num_embeds_ada_norm=1000)
    vae = AutoencoderKL(latent_channels=4, norm_num_groups=8, block_out_channels=(16,))
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def test_a_unet_that_does_not_fit_its_text_encoder_vae_or_image_size_is_refused_before_the_index(
        tiny_models, tmp_path, inputs, no_index):
    """Each passed the class checks, loaded, and failed in every sampler after the index build: an
    override UNet trained with another text encoder (an SD 2.x fine-tune, 1024 wide, on an SD 1.5 base:
    "mat1 and mat2 shapes cannot be multiplied"), one whose input channels are not the VAE's latents, a
    UNet saved without sample_size and no sampling.height/width ("cannot unpack non-iterable NoneType"),
    and a 5-level unconditional UNet at a size that does not halve 4 times ("Sizes of tensors must
    match"). Now each is named, with the keys, before anything is written."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

    from memex.models import check_unet_fits
    from memex.stages import audit

    base = tiny_models["latent_text"]
    config = UNet2DConditionModel.load_config(Path(base) / "unet")
    wide = tmp_path / "sd2-unet"
    UNet2DConditionModel.from_config({**config, "cross_attention_dim": 2 * config["cross_attention_dim"]}
                                     ).save_pretrained(wide)
    check_model_inputs(base, str(wide))  # the class checks pass it
    with pytest.raises(ModelError, match=rf"model.unet={re.escape(str(wide))}: the UNet takes text states of "
                                         r"width 64 .*gives 32.*give the base it was fine-tuned from"):
        audit.run(_audit_cfg(tmp_path, base, *inputs, f"model.unet={wide}"))
    latents = tmp_path / "latents-unet"
    UNet2DConditionModel.from_config({**config, "in_channels": 8, "out_channels": 8}).save_pretrained(latents)
    with pytest.raises(ModelError, match=r"takes 8 input channels, and the VAE .* latents of 4"):
        check_unet_fits(base, str(latents), None, None, None, None)
    nosize = _with_unet(base, tmp_path / "nosize", "UNet2DConditionModel", sample_size=None)
    with pytest.raises(ModelError, match=r"no sample_size.*set sampling.height and sampling.width"):
        audit.run(_audit_cfg(tmp_path, nosize, *inputs))
    with pytest.raises(_IndexStarted):  # with them, it passes
        audit.run(_audit_cfg(tmp_path, nosize, *inputs, "sampling.height=16", "sampling.width=16"))
    deep = tmp_path / "deep"
    DDPMPipeline(unet=UNet2DModel(sample_size=32, block_out_channels=(8,) * 5, layers_per_block=1,
                                  down_block_types=("DownBlock2D",) * 5, up_block_types=("UpBlock2D",) * 5,
                                  norm_num_groups=8), scheduler=DDPMScheduler()).save_pretrained(deep)
    with pytest.raises(ModelError, match=r"image size 40x40, and this UNet has 5 levels .* multiples of 16"):
        audit.run(compose(["model=local", f"model.path={deep}", "trainset=manifest", f"trainset.path={inputs[0]}",
                           "prompts=none", "match=relative", f"storage.root={tmp_path / 'runs'}",
                           "sampling.height=40", "sampling.width=40"], config_name="audit"))
    check_unet_fits(str(deep), None, None, None, None, None)  # its own 32 px: fine
    assert not (tmp_path / "runs").exists()


def _ldm(path: Path) -> Path:
    """A tiny real LDMPipeline: a UNet2DModel over the latents of a VQ autoencoder (its `vqvae`)."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    vq = VQModel(block_out_channels=(8,), norm_num_groups=8, latent_channels=3, num_vq_embeddings=16,
                 down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def test_a_pipeline_memex_cannot_sample_is_refused_before_the_index(tiny_models, tmp_path, inputs, no_index,
                                                                    monkeypatch):
    """SDXL (its UNet needs pooled text and size embeddings), an inpainting UNet (9 input channels),
    a class-conditional DDPM and a transformer pipeline (DiT) failed in the sampler actors after the
    index build and a claimed run folder (SDXL: "TypeError: argument of type 'NoneType' is not
    iterable"). Each is refused from its configs, naming the folder, what it needs and what memex samples."""
    from memex.stages import audit

    sdxl = _sdxl(tmp_path / "sdxl")
    cases = {
        sdxl: r"\(StableDiffusionXLPipeline\): its UNet needs added conditioning \(addition_embed_type='text_time'",
        _with_unet(tiny_models["latent_text"], tmp_path / "inpaint", "UNet2DConditionModel", in_channels=9):
            r"its UNet takes 9 input channels for 4 output channels: an inpainting",
        _with_unet(tiny_models["unconditional"], tmp_path / "classes", "UNet2DModel", num_class_embeds=10):
            r"\(DDPMPipeline\): its UNet is class-conditional \(num_class_embeds=10\)",
        _dit(tmp_path / "dit"): r"\(DiTPipeline\) has no unet component \(it holds scheduler, transformer, vae\)",
        # an unconditional latent model (CompVis' CelebA-HQ LDM): its latents were saved as the images
        _ldm(tmp_path / "ldm"): r"\(LDMPipeline\) decodes its latents with a vqvae",
        # LCM / TCD: the guidance scale is an embedding input, run without it off what the UNet learned
        _with_unet(tiny_models["latent_text"], tmp_path / "lcm", "UNet2DConditionModel", time_cond_proj_dim=32):
            r"its UNet is guidance-distilled \(time_cond_proj_dim=32: LCM",
    }
    for path, message in cases.items():
        with pytest.raises(ModelError, match=rf"^model.path={re.escape(str(path))} .*{message}.*memex samples UNet"):
            check_model_inputs(str(path))
    with pytest.raises(ModelError, match=cases[sdxl]):
        audit.run(_audit_cfg(tmp_path, sdxl, *inputs))
    assert not (tmp_path / "runs").exists()
    # the UNet of one as the fine-tuned UNet on a base memex samples
    with pytest.raises(ModelError, match=rf"^model.unet={re.escape(str(sdxl / 'unet'))}: the UNet needs added"):
        check_model_inputs(tiny_models["latent_text"], str(sdxl / "unet"))
    # a hub id not cached here is checked after its load, on the loaded UNet's config
    import memex.models as models

    monkeypatch.setattr(models, "check_model_inputs", lambda *a, **k: None)
    with pytest.raises(ModelError, match=cases[sdxl]):
        load_model(str(sdxl))
    monkeypatch.undo()
    # the tiny models pass, and so do IF's two UNet traits: learned variance (3 in, 6 out) is not an
    # image input, and addition_embed_type="text" embeds the prompt's encoder states in the UNet itself
    for kind, model in tiny_models.items():
        assert check_model_inputs(model).value == kind
    assert check_model_inputs(str(_with_unet(tiny_models["unconditional"], tmp_path / "learned", "UNet2DModel",
                                             out_channels=6))).value == "unconditional"
    if_like = _with_unet(tiny_models["pixel_text"], tmp_path / "if", "UNet2DConditionModel", out_channels=6,
                         addition_embed_type="text", addition_embed_type_num_heads=2)
    assert check_model_inputs(str(if_like)).value == "pixel_text"


def test_a_folder_of_fp16_variant_weights_is_read_with_model_variant(tiny_models, tmp_path):
    """A folder saved with save_pretrained(variant="fp16") (hub repos ship such copies) holds only
    diffusion_pytorch_model.fp16.safetensors: the check passed it, then every sampler actor failed
    with "no file named model.safetensors" and a hint about pickle weights. Now it is named before any
    work with the fix, model.variant=fp16 reads it (components without the variant fall back to
    their standard files, as diffusers does), and the run identity has the variant only when set."""
    import pyarrow as pa
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from memex.config import GenerateConfig, model_identity
    from memex.stages.generate import run_settings

    src = tiny_models["latent_text"]
    variant = tmp_path / "fp16"
    DiffusionPipeline.from_pretrained(src, dtype=torch.float16).save_pretrained(variant, variant="fp16")
    assert (variant / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with pytest.raises(ModelError, match=rf"^model.path={re.escape(str(variant))}: .*text_encoder has only the "
                                         r"fp16 variant of its weights \(model.fp16.safetensors\), .*"
                                         r"set model.variant=fp16$"):
        check_model_inputs(str(variant))
    assert check_model_inputs(str(variant), variant="fp16").value == "latent_text"
    with pytest.raises(ModelError, match=r"^model.variant=fp16 but no component of model.path=.* has fp16 weights"):
        check_model_inputs(src, variant="fp16")
    # the variant's weights are what is loaded (float16 values, upcast to the float32 run)
    loaded = load_model(str(variant), variant="fp16").pipe.unet.state_dict()
    half = load_file(variant / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert all(torch.equal(loaded[k], half[k].float()) for k in half) and loaded.keys() == half.keys()
    # a fine-tuned UNet (a trainer's checkpoint: no variant) on a variant base
    unet = tmp_path / "checkpoint-100" / "unet"
    UNet2DConditionModel.from_pretrained(Path(src) / "unet").save_pretrained(unet)
    model = load_model(str(variant), unet=str(unet), variant="fp16")
    assert torch.equal(model.pipe.unet.state_dict()[next(iter(half))], load_file(
        unet / "diffusion_pytorch_model.safetensors")[next(iter(half))])
    # the reverse: a plain base and a UNet saved with the variant alone. Unset, the UNet was refused ("set
    # model.variant=fp16"); set, the base was ("no component of model.path has fp16 weights"): no way to load it
    fp16_unet = tmp_path / "fp16-unet"
    UNet2DConditionModel.from_pretrained(Path(src) / "unet").save_pretrained(fp16_unet, variant="fp16")
    assert check_model_inputs(src, unet=str(fp16_unet), variant="fp16").value == "latent_text"
    w = next(iter(half))
    assert torch.equal(load_model(src, unet=str(fp16_unet), variant="fp16").pipe.unet.state_dict()[w],
                       load_file(fp16_unet / "diffusion_pytorch_model.fp16.safetensors")[w].float())
    # identity: unset is absent, so runs made before the key resume under their names
    prompts = pa.table({"prompt_id": ["p1"], "prompt": ["a logo"]})
    cfg = GenerateConfig()
    assert "variant" not in run_settings(cfg, prompts)["model"] and "allow_pickle" not in model_identity(cfg.model)
    cfg.model.variant = "fp16"
    assert run_settings(cfg, prompts)["model"]["variant"] == "fp16"


def test_an_image_folder_without_the_captions_to_rank_is_refused_before_the_index(tiny_models, tmp_path, inputs,
                                                                                   no_index):
    """The audit's default prompts rank the training captions. An image folder whose imagefolder
    metadata lacks trainset.caption_column (diffusers' scripts call it text), or that has no
    captions at all, was found after the whole index was built."""
    from memex.stages import audit

    folder = tmp_path / "set" / "train"
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))

    def run(*extra):
        audit.run(compose(["model=local", f"model.path={tiny_models['pixel_text']}", "trainset=manifest",
                           f"trainset.path={tmp_path / 'set'}", f"storage.root={tmp_path / 'runs'}",
                           "resources.address=127.0.0.1:1", *extra], config_name="audit"))

    with pytest.raises(ConfigError, match=r"the image folder has no captions to rank as prompts \(no metadata.jsonl "
                                          r"or metadata.csv, no <stem>.txt beside .*0.png\): give prompts=file"):
        run()
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a logo"}\n')
    with pytest.raises(ConfigError, match=r"train/metadata.jsonl has no 'caption' column \(trainset.caption_column\) "
                                          r"to rank as prompts \(columns: \['file_name', 'text'\]\): set "
                                          r"trainset.caption_column=<column>"):
        run()
    assert not (tmp_path / "runs").exists()
    with pytest.raises(_IndexStarted):
        run("trainset.caption_column=text")
    (folder / "metadata.jsonl").unlink()  # sidecar captions, and a root-level metadata.csv, pass too
    (folder / "0.txt").write_text("a logo")
    with pytest.raises(_IndexStarted):
        run()
    (folder / "0.txt").unlink()
    (tmp_path / "set" / "metadata.csv").write_text("file_name,caption\ntrain/0.png,a logo\n")
    with pytest.raises(_IndexStarted):
        run()


def test_a_storage_root_inside_the_training_set_is_refused(tiny_models, tmp_path, inputs, no_index, monkeypatch):
    """storage.root defaults to ./runs: an audit started in its image folder with trainset.path=.
    wrote the index and the samples into the training set, and the next audit read those Parquet
    files as its manifest ("needs an 'id' column ... columns: [caption, gid, id, ...]"). Refused
    before anything is written, for index.root too; a folder left that way is named by the listing."""
    from memex.ingest import IngestError, list_training_set
    from memex.stages import audit

    _, prompts = inputs
    images = tmp_path / "set"
    images.mkdir()
    (images / "0.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    monkeypatch.chdir(images)

    def run(*extra):
        audit.run(compose(["model=local", f"model.path={tiny_models['pixel_text']}", "trainset=manifest",
                           "trainset.path=.", "prompts=file", f"prompts.path={prompts}",
                           "resources.address=127.0.0.1:1", *extra], config_name="audit"))

    with pytest.raises(ConfigError, match=rf"^storage.root=runs \({re.escape(str(images / 'runs'))}\) is inside "
                                          r"trainset.path=\. .*set storage.root to a folder outside it$"):
        run()
    with pytest.raises(ConfigError, match=r"^index.root=.*/set/idx\) is inside trainset.path=\."):
        run(f"storage.root={tmp_path / 'out'}", f"index.root={images / 'idx'}")
    assert sorted(p.name for p in images.iterdir()) == ["0.png"] and not (tmp_path / "out").exists()
    with pytest.raises(_IndexStarted):  # beside it, sharing the name's prefix: outside
        run(f"storage.root={tmp_path / 'set-runs'}")
    # a training folder a storage.root inside it already wrote to: named, not read as a manifest
    (images / "runs" / "_index" / "0123").mkdir(parents=True)
    (images / "runs" / "_index" / "0123" / "_SUCCESS.json").write_text("{}")
    pq.write_table(pa.table({"gid": [0], "id": ["0.png"]}), images / "runs" / "_index" / "0123" / "dups.parquet")
    with pytest.raises(IngestError, match=rf"trainset.path=\. holds memex's own outputs under "
                                          rf"{re.escape(str(images / 'runs'))} \(a storage.root"):
        list_training_set(".")


def test_webdataset_shards_pass_the_audits_checks(tiny_models, tmp_path, no_index):
    """img2dataset writes a metadata .parquet beside each .tar: the preflight read the folder as that
    manifest and refused it ("needs an 'id' column"); the shards are the training set."""
    import io
    import tarfile

    from memex.stages import audit

    folder = tmp_path / "laion"
    folder.mkdir()
    data = encode_png(np.zeros((8, 8, 3), np.uint8))
    with tarfile.open(folder / "00000.tar", "w") as tf:
        for name, payload in (("000000000.png", data), ("000000000.txt", b"a logo")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    pq.write_table(pa.table({"key": ["000000000"], "url": ["http://x/0.png"]}), folder / "00000.parquet")
    for given in (folder, folder / "00000.tar"):  # the folder, or one shard alone
        with pytest.raises(_IndexStarted):
            audit.run(compose(["model=local", f"model.path={tiny_models['pixel_text']}", "trainset=manifest",
                               f"trainset.path={given}", f"storage.root={tmp_path / 'runs'}",
                               "resources.address=127.0.0.1:1"], config_name="audit"))


def test_the_audit_picks_the_index_its_generations_need(tiny_models):
    """The index an audit searches follows its generations: the luma of the training images for a
    1-channel model, the generations' aspect for non-square sampling (sampling.height/width, else the
    UNet's native size); a square RGB audit keeps the plain index."""
    from memex.stages.audit import generation_aspect, gray_generations

    def cfg(model, *extra):
        return compose(["model=local", f"model.path={model}", *extra], config_name="audit")

    text = tiny_models["latent_text"]
    assert generation_aspect(cfg(text)) is None and not gray_generations(cfg(text))
    assert generation_aspect(cfg(text, "sampling.height=16", "sampling.width=24")) == (16, 24)
    assert generation_aspect(cfg(text, "sampling.height=24")) == (24, 16)  # the width from the native 16
