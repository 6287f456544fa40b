"""model.lora (memex/lora.py): a LoRA fine-tune, in the layout diffusers' LoRA training scripts
write, loaded onto its base and fused; checked against the base before any cluster work.

The LoRAs here (conftest.make_lora) are made the way train_text_to_image_lora.py makes them:
peft adapters on the UNet's attention projections, saved with save_lora_weights, with random up
factors so that they change the samples."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from memex import tiny
from memex.config import GenerateConfig, SamplingConfig
from memex.models import ModelError, check_model_inputs, load_model
from memex.sampling import Sampler

from conftest import compose, make_lora


def _samples(model) -> np.ndarray:
    return Sampler(model, SamplingConfig(num_inference_steps=3, guidance_scale=3.0, batch_size=2)).generate(
        ["p1", "p1"], ["a red logo", "a red logo"], [1, 2])


@pytest.fixture(scope="module")
def lora(tiny_models, tmp_path_factory) -> Path:
    return make_lora(tiny_models["latent_text"], tmp_path_factory.mktemp("lora") / "out")


def test_a_lora_is_fused_into_its_base_and_changes_the_samples(tiny_models, lora):
    base_path = tiny_models["latent_text"]
    base, tuned = load_model(base_path), load_model(base_path, lora=str(lora))
    assert tuned.model_id == f"{base_path}+lora={lora}"
    # fused: a plain UNet (no adapter layers) whose adapted weights moved by up @ down, the others not
    factors = load_file(lora / "pytorch_lora_weights.safetensors")
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    down, up = (factors[f"unet.{module}.lora.{f}.weight"] for f in ("down", "up"))
    before, after = base.pipe.unet.state_dict(), tuned.pipe.unet.state_dict()
    assert set(after) == set(before) and not any("lora" in k for k in after)
    torch.testing.assert_close(after[f"{module}.weight"], before[f"{module}.weight"] + up @ down)
    assert torch.equal(after["conv_in.weight"], before["conv_in.weight"])
    assert not np.array_equal(_samples(base), _samples(tuned))
    # the file itself is accepted too, and gives the same model
    by_file = load_model(base_path, lora=str(lora / "pytorch_lora_weights.safetensors"))
    assert torch.equal(by_file.pipe.unet.state_dict()[f"{module}.weight"], after[f"{module}.weight"])


def test_a_lora_file_named_from_its_own_folder_loads(tiny_models, lora, monkeypatch):
    """`model.lora=pytorch_lora_weights.safetensors` run in the LoRA's folder (and a kohya file found at the
    top of `nightly.location=.`): the file's folder is "", which diffusers took for a hub id, so the
    preflight passed and every sampler failed on "couldn't connect to huggingface.co"."""
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    want = load_model(tiny_models["latent_text"], lora=str(lora)).pipe.unet.state_dict()[f"{module}.weight"]
    monkeypatch.chdir(lora)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = load_model(tiny_models["latent_text"], lora="pytorch_lora_weights.safetensors")
    assert torch.equal(got.pipe.unet.state_dict()[f"{module}.weight"], want)


def test_a_lora_of_the_text_encoder_too_is_fused_and_checked(tiny_models, lora, tmp_path):
    """train_dreambooth_lora.py --train_text_encoder saves text-encoder adapters beside the UNet's, under
    diffusers' lora_linear_layer names. They are fused into the text encoder (each adapted projection
    moves by up @ down, the samples change against the UNet-only LoRA), and checked against the base
    before any work like the UNet's: those names went unchecked, so one of another base (a wider text
    encoder) failed in every sampler actor. Made and loaded on peft 0.21 and transformers 5."""
    base_path = tiny_models["latent_text"]
    both = make_lora(base_path, tmp_path / "both", text_encoder=True)
    factors = load_file(both / "pytorch_lora_weights.safetensors")
    te_keys = [k for k in factors if k.startswith("text_encoder.")]
    assert te_keys and all(".lora_linear_layer." in k for k in te_keys)
    assert check_model_inputs(base_path, lora=str(both)).value == "latent_text"
    base, tuned = load_model(base_path), load_model(base_path, lora=str(both))
    before, after = base.pipe.text_encoder.state_dict(), tuned.pipe.text_encoder.state_dict()
    assert set(after) == set(before) and not any("lora" in k for k in after)
    module = next(k for k in te_keys if k.endswith("down.weight"))[len("text_encoder."):-len(".lora_linear_layer.down"
                                                                                              ".weight")]
    down, up = (factors[f"text_encoder.{module}.lora_linear_layer.{f}.weight"] for f in ("down", "up"))
    name = next(k for k in after if k.endswith(module.removeprefix("text_model.") + ".weight"))
    torch.testing.assert_close(after[name], before[name] + up @ down)
    assert sum(not torch.equal(before[k], after[k]) for k in before) == len(te_keys) // 2  # weights, not biases
    assert not np.array_equal(_samples(tuned), _samples(load_model(base_path, lora=str(lora))))

    # a text-encoder LoRA of another base: its projections twice as wide
    wide = {k: torch.cat([v, v], dim=1 if k.endswith("down.weight") else 0) if k.startswith("text_encoder.") else v
            for k, v in factors.items()}
    (tmp_path / "wide").mkdir()
    save_file(wide, tmp_path / "wide" / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelError, match=r"model.lora=.*wide: tensor 'text_encoder\..*lora_linear_layer\.down\.weight' "
                                         r"has shape \[4, 64\] but model.path's text_encoder .* is \[32, 32\]: a LoRA "
                                         r"trained on another base model"):
        check_model_inputs(base_path, lora=str(tmp_path / "wide"))

    # with model.text_encoder, the LoRA's text-encoder tensors are checked against the override, which is what
    # loads (they were checked against the base's, and a LoRA of the base passed beside a wider override)
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig.from_pretrained(f"{base_path}/text_encoder")
    CLIPTextModel(CLIPTextConfig(**{**cfg.to_dict(), "hidden_size": 64, "intermediate_size": 64})).save_pretrained(
        tmp_path / "te64")
    with pytest.raises(ModelError, match=r"model.lora=.*both: tensor 'text_encoder\..*' has shape \[4, 32\] but "
                                         r"model.path's text_encoder .* is \[64, 64\]"):
        check_model_inputs(base_path, lora=str(both), text_encoder=str(tmp_path / "te64"))


def test_the_run_identity_carries_the_lora_only_when_set(tiny_models, lora):
    import pyarrow as pa

    from memex.stages.generate import default_run_name, run_settings

    prompts = pa.table({"prompt_id": ["p1"], "prompt": ["a logo"]})
    cfg = GenerateConfig()
    plain = run_settings(cfg, prompts)
    assert "lora" not in plain["model"]  # runs made before model.lora existed keep their names
    cfg.model.lora = str(lora)
    tuned = run_settings(cfg, prompts)
    assert tuned["model"]["lora"] == str(lora) and default_run_name(cfg, tuned) != default_run_name(cfg, plain)


def test_a_lora_that_does_not_fit_its_base_is_refused_before_any_work(tiny_models, lora, tmp_path):
    """A LoRA of another base loads in diffusers without a word and changes nothing (or only the
    modules whose names happen to match): an audit of it reports the base model. Refused from the
    file's header and the base's configs, naming the first module or tensor."""
    other = tiny.build_sd15(tmp_path / "sd15", image_size=64)
    with pytest.raises(ModelError, match=r"^model.lora=.* adapts \d+ of its 32 unet modules that model.path's unet "
                                         r"does not have \(first: 'down_blocks.0.attentions.0"):
        check_model_inputs(str(other), lora=str(lora))
    # same module names, other widths: a tensor whose features do not fit
    file = lora / "pytorch_lora_weights.safetensors"
    tensors = load_file(file)
    key = next(k for k in sorted(tensors) if k.endswith("lora.down.weight"))
    tensors[key] = torch.zeros(4, tensors[key].shape[1] + 8)
    (tmp_path / "wide").mkdir()
    save_file(tensors, tmp_path / "wide" / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelError, match=rf"tensor {re.escape(repr(key))} has shape \[4, \d+\] but model.path's unet "):
        check_model_inputs(tiny_models["latent_text"], lora=str(tmp_path / "wide"))
    # not a LoRA, not there, cut short, on a model whose pipeline loads none
    cases = {tiny_models["latent_text"] + "/unet": "holds no LoRA tensors .*: a fully fine-tuned UNet goes in "
                                                   "model.unet",
             str(tmp_path / "nowhere"): "no such file or folder"}
    cut = tmp_path / "cut" / "pytorch_lora_weights.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(file.read_bytes()[:2000])
    cases[str(cut.parent)] = "is truncated"
    for path, message in cases.items():
        with pytest.raises(ModelError, match=rf"^model.lora={re.escape(path)}: .*{message}"):
            check_model_inputs(tiny_models["latent_text"], lora=path)
    with pytest.raises(ModelError, match=r"an unconditional model: its pipeline \(DDPMPipeline\) loads no LoRA"):
        check_model_inputs(tiny_models["unconditional"], lora=str(lora))
    # through generate: refused before a run folder is claimed
    from memex.stages import generate

    with pytest.raises(ModelError, match="adapts"):
        generate.prepare(compose(["model=local", f"model.path={other}", f"model.lora={lora}",
                                  f"storage.root={tmp_path / 'runs'}"]))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("suffixes, kind", [((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"), "LoHa"),
                                             ((".lokr_w1", ".lokr_w2"), "LoKr"), ((".oft_blocks",), "OFT"),
                                             ((".diff",), "full-difference")])
def test_a_lycoris_adapter_that_is_not_a_lora_is_named_before_any_work(tiny_models, tmp_path, suffixes, kind):
    """LyCORIS's LoHa and LoKr files (kohya-style names, common on model hubs) passed the header check
    and failed on every sampler actor with diffusers' "keys have not been correctly renamed". Named
    before any work now, with the fix: merge it into the UNet, give model.unet."""
    from diffusers import UNet2DConditionModel

    base = tiny_models["latent_text"]
    unet = UNet2DConditionModel.from_pretrained(base + "/unet")
    linears = [(n, m) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)][:3]
    tensors = {}
    for name, module in linears:
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update({key + s: torch.randn(module.weight.shape[0], 2) for s in suffixes})
        tensors[key + ".alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / f"{kind}.safetensors")
    with pytest.raises(ModelError, match=rf"^model.lora=.*{kind}.safetensors: .* is a LyCORIS {kind} adapter, not a "
                                         r"LoRA: diffusers cannot load it\. Merge it .* give that UNet as model.unet"):
        check_model_inputs(base, lora=str(tmp_path / f"{kind}.safetensors"))
    with pytest.raises(ModelError, match=r"^model.path=.* is a LyCORIS adapter \(LoHa, LoKr, \.\.\.\), not a diffusers "
                                         r"pipeline folder, nor a LoRA diffusers loads: merge it"):
        check_model_inputs(str(tmp_path / f"{kind}.safetensors"))


def test_a_lora_that_changes_no_weight_is_refused_when_loaded(tiny_models, lora, tmp_path):
    """The load-time guard for what the header check cannot see (formats diffusers converts, hub
    ids): every up factor zero on the layers it was loaded into."""
    tensors = {k: torch.zeros_like(v) if ".lora.up." in k else v
               for k, v in load_file(lora / "pytorch_lora_weights.safetensors").items()}
    (tmp_path / "zero").mkdir()
    save_file(tensors, tmp_path / "zero" / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelError, match=r"model.lora=.*zero changes no weight of model.path=.*: its up \(B\) factor "
                                         r"is zero on every one of the 32 layers"):
        load_model(tiny_models["latent_text"], lora=str(tmp_path / "zero"))


def test_a_lora_retrained_into_the_same_folder_is_refused_not_reported_as_the_old_ones(tiny_models, tmp_path):
    """The run folder's settings hold model.lora's path, not its weights, and the default run name is taken
    of them: a LoRA retrained into the same output_dir (diffusers' scripts overwrite
    pytorch_lora_weights.safetensors) resumed the old folder, found every shard done, and reported the old
    weights' extractions. weights.json records the weights; other weights there are refused, naming the fix,
    and nothing is written. A folder from before weights.json takes today's weights as its record."""
    import shutil

    from memex.checkpoints import CheckpointError
    from memex.layout import RunLayout
    from memex.stages import generate

    base = shutil.copytree(tiny_models["latent_text"], tmp_path / "base")
    lora = make_lora(str(base), tmp_path / "out", seed=1)
    settings = ["model=local", f"model.path={base}", f"model.lora={lora}", f"storage.root={tmp_path / 'runs'}"]
    cfg = compose(settings)
    name = generate.prepare(cfg)
    layout = RunLayout(str(tmp_path / "runs"), name)
    record = layout.store.read_json(layout.weights_json)
    assert generate.prepare(cfg) == name  # the same weights: resumed
    # files no load reads are no other model: an fp16 variant downloaded beside the weights, a .bin copy
    unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(unet, unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    shutil.copy(unet, unet.with_name("diffusion_pytorch_model.bin"))
    assert generate.prepare(cfg) == name
    make_lora(tiny_models["latent_text"], tmp_path / "out", seed=2)  # retrained: the same file name, new weights
    with pytest.raises(CheckpointError, match=rf"the weights at model.path=.*, model.lora={re.escape(str(lora))} "
                                              rf"changed since run folder .*{name} was written with them .*Nothing was "
                                              r"changed. Audit the new weights under another run.name"):
        generate.prepare(cfg)
    assert layout.store.read_json(layout.weights_json) == record
    assert generate.prepare(compose([*settings, "run.name=retrained"])) == "retrained"
    (tmp_path / "runs" / name / "weights.json").unlink()  # a folder written before the record was kept
    assert generate.prepare(cfg) == name and layout.store.read_json(layout.weights_json) != record


def _old_format(key: str) -> str:
    """Today's `unet.<module>.to_q.lora.down.weight` as diffusers < 0.21 (unet.save_attn_procs) wrote it:
    no component prefix, `<module>.processor.to_q_lora.down.weight`, `to_out.0` as `to_out_lora`."""
    k = key.removeprefix("unet.").replace(".to_out.0.lora.", ".processor.to_out_lora.")
    return re.sub(r"\.(to_[qkv])\.lora\.", r".processor.\1_lora.", k)


def test_a_lora_in_diffusers_older_unprefixed_format_is_fused_and_checked(tiny_models, lora, tmp_path):
    """diffusers before 0.21 saved a UNet LoRA without the `unet.` prefix (attn procs keys); diffusers 0.42
    loads prefixed keys only, dropped every one with a log line, and memex refused the LoRA as "changes
    no weight ... a LoRA of another base", after the index build, for the base it was made for. It is
    read now, checked before any work like today's format, and fuses to the same weights."""
    base_path = tiny_models["latent_text"]
    factors = load_file(lora / "pytorch_lora_weights.safetensors")
    (tmp_path / "old").mkdir()
    save_file({_old_format(k): v for k, v in factors.items()}, tmp_path / "old" / "pytorch_lora_weights.safetensors")
    assert any(".processor.to_out_lora.up.weight" in k for k in load_file(tmp_path / "old" / "pytorch_lora_weights"
                                                                             ".safetensors"))
    check_model_inputs(base_path, lora=str(tmp_path / "old"))
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    today = load_model(base_path, lora=str(lora)).pipe.unet.state_dict()[f"{module}.weight"]
    old = load_model(base_path, lora=str(tmp_path / "old")).pipe.unet.state_dict()[f"{module}.weight"]
    torch.testing.assert_close(old, today)
    # one of another base, in that format, is refused before any work as the prefixed one is
    wide = {k: torch.zeros(v.shape[0], v.shape[1] + 8) if k.endswith("to_k_lora.down.weight") else v
            for k, v in load_file(tmp_path / "old" / "pytorch_lora_weights.safetensors").items()}
    save_file(wide, tmp_path / "old" / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelError, match=r"has shape .* but model.path's unet .*to_k.weight is .*another base model"):
        check_model_inputs(base_path, lora=str(tmp_path / "old"))


def test_a_lora_path_that_reads_as_a_hub_id_or_holds_only_checkpoints_names_the_fix(tiny_models, lora, tmp_path,
                                                                                    monkeypatch):
    """`model.lora=out/checkpoint-5000` (a typo; out/ is here) and a relative path to a weights file from
    another folder read as hub ids and failed on every sampler actor after the index build; a training
    folder with only checkpoint-<step>/ folders said "holds no .safetensors file" without naming them."""
    import shutil

    base_path = tiny_models["latent_text"]
    (tmp_path / "out").mkdir()
    shutil.copytree(lora, tmp_path / "out" / "checkpoint-500")
    shutil.copytree(lora, tmp_path / "out" / "checkpoint-1000")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"model.lora=out/checkpoint-5000: no such file or folder; out/ is a folder "
                                         r"here: did you mean out/checkpoint-500"):
        check_model_inputs(base_path, lora="out/checkpoint-5000")
    with pytest.raises(ModelError, match=r"model.lora=runs/pytorch_lora_weights.safetensors: no such file or folder "
                                         r"\(a hub LoRA is <user>/<repo>"):
        check_model_inputs(base_path, lora="runs/pytorch_lora_weights.safetensors")
    with pytest.raises(ModelError, match=r"model.lora=out holds no .safetensors file .*its checkpoint folders do "
                                         r"\(checkpoint-500, checkpoint-1000\): set model.lora=out/checkpoint-1000"):
        check_model_inputs(base_path, lora="out")
    check_model_inputs(base_path, lora="out/checkpoint-500")
    (tmp_path / "latent-consistency").mkdir()  # a folder of a hub user's name, with nothing near the repo's
    check_model_inputs(base_path, lora="latent-consistency/lcm-lora-sdv1-5")  # left to the hub, as a hub id
