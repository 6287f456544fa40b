"""model.lora (memex/lora.py) in the formats diffusers converts on load: kohya's lora_unet_*, diffusers
0.17-0.20's prefixed attn-processor names, SDXL's kohya files; checked against the base under the names
the load gives them, and refused when the load dropped some of the modules they adapt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memex import tiny
from memex.models import ModelError, check_model_inputs, load_model

from conftest import make_lora

MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"


@pytest.fixture(scope="module")
def lora(tiny_models, tmp_path_factory) -> Path:
    return make_lora(tiny_models["latent_text"], tmp_path_factory.mktemp("lora") / "out")


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    return tiny.build_sd15(tmp_path_factory.mktemp("sd15") / "sd15", image_size=64)


def _kohya(lora: Path, folder: Path) -> Path:
    """The diffusers-format LoRA in kohya's names: unet.<module>.lora.down.weight -> lora_unet_<module_>.lora_down
    .weight, with an alpha equal to the rank (scale 1, as the diffusers file)."""
    tensors = {}
    for k, v in load_file(lora / "pytorch_lora_weights.safetensors").items():
        module, factor = k.removeprefix("unet.").rsplit(".lora.", 1)
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_{factor}"] = v
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    folder.mkdir()
    save_file(tensors, folder / "my_lora.safetensors")
    return folder


def _old_prefixed(lora: Path, folder: Path) -> Path:
    """diffusers 0.17-0.20's save_lora_weights: attn-processor names with the `unet.` prefix
    (unet.<block>.attn1.processor.to_k_lora.down.weight)."""
    def old(k: str) -> str:
        k = k.replace(".to_out.0.lora.", ".processor.to_out_lora.")
        return re.sub(r"\.(to_[qkv])\.lora\.", r".processor.\1_lora.", k)

    folder.mkdir()
    save_file({old(k): v for k, v in load_file(lora / "pytorch_lora_weights.safetensors").items()},
              folder / "pytorch_lora_weights.safetensors")
    return folder


def test_kohya_and_old_prefixed_loras_of_another_base_are_refused_before_any_work(tiny_models, lora, other_base,
                                                                                   tmp_path):
    """Their keys end in no suffix the check read (lora_down, to_k_lora.down), so one of another base passed the
    preflight and loaded its 8 modules whose names matched of its 32: an audit of mostly the base model. Checked
    now under the names diffusers' load gives them; for their own base they pass and fuse as the diffusers file."""
    base = tiny_models["latent_text"]
    want = load_model(base, lora=str(lora)).pipe.unet.state_dict()[f"{MODULE}.weight"]
    for folder in (_kohya(lora, tmp_path / "kohya"), _old_prefixed(lora, tmp_path / "old")):
        with pytest.raises(ModelError, match=rf"^model.lora={re.escape(str(folder))} adapts 24 of its 32 unet "
                                             r"modules that model.path's unet does not have \(first: 'down_blocks"):
            check_model_inputs(str(other_base), lora=str(folder))
        check_model_inputs(base, lora=str(folder))
        torch.testing.assert_close(load_model(base, lora=str(folder)).pipe.unet.state_dict()[f"{MODULE}.weight"], want)
    # the features checked too: a kohya file of the same module names, other widths
    tensors = load_file(tmp_path / "kohya" / "my_lora.safetensors")
    key = "lora_unet_" + MODULE.replace(".", "_") + ".lora_down.weight"
    tensors[key] = torch.zeros(4, tensors[key].shape[1] + 8)
    (tmp_path / "wide").mkdir()
    save_file(tensors, tmp_path / "wide" / "my_lora.safetensors")
    with pytest.raises(ModelError, match=rf"tensor {re.escape(repr(key))} has shape \[4, \d+\] but model.path's unet "
                                         rf"{re.escape(MODULE)}.weight is"):
        check_model_inputs(base, lora=str(tmp_path / "wide"))


def test_an_sdxl_kohya_lora_for_an_sd1_base_is_refused_before_any_work(tiny_models, tmp_path):
    """An SDXL LoRA in kohya's names (lora_unet_input_blocks_*, lora_te1_*, lora_te2_*) passed the preflight and
    failed in every sampler actor with peft's "Target modules ... not found". Refused before any work, naming
    the component an SD 1.x pipeline does not have."""
    tensors = {}

    def add(name: str, features_in: int, features_out: int) -> None:
        tensors[name + ".lora_down.weight"] = torch.randn(4, features_in)
        tensors[name + ".lora_up.weight"] = torch.randn(features_out, 4)
        tensors[name + ".alpha"] = torch.tensor(4.0)

    for block, width in (("input_blocks_4_1", 640), ("middle_block_1", 1280)):
        for proj in ("to_q", "to_k", "to_v"):
            add(f"lora_unet_{block}_transformer_blocks_0_attn1_{proj}", width, width)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        add(f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}", 768, 768)
        add(f"lora_te2_text_model_encoder_layers_0_self_attn_{proj}", 1280, 1280)
    (tmp_path / "sdxl").mkdir()
    save_file(tensors, tmp_path / "sdxl" / "sdxl_style.safetensors")
    with pytest.raises(ModelError, match=r"^model.lora=.*sdxl adapts modules of text_encoder_2 \(first tensor: "
                                         r"'lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight'\), "
                                         r"which model.path's pipeline does not have"):
        check_model_inputs(tiny_models["latent_text"], lora=str(tmp_path / "sdxl"))


def test_a_lora_the_load_adapts_only_partly_is_refused_when_loaded(lora, other_base, tmp_path):
    """What the preflight cannot see (a hub LoRA, a hub base): apply_lora refused only a LoRA that adapted no
    layer, so one of another base fused its 8 matching modules of 32 without a word. The modules the file
    adapts are compared with those the load adapted, naming the first dropped."""
    from memex.lora import apply_lora

    pipe = load_model(str(other_base)).pipe
    kohya = _kohya(lora, tmp_path / "kohya")
    with pytest.raises(ModelError, match=rf"^model.lora={re.escape(str(kohya))}: diffusers loaded 8 of the 32 modules "
                                         rf"it adapts into model.path={re.escape(str(other_base))}; the others are no "
                                         r"module of it \(first: 'unet.down_blocks.0.attentions.0.transformer_blocks.0"
                                         r".attn1.to_k'\): a LoRA trained on another base model"):
        apply_lora(pipe, str(kohya), str(other_base))


def _unet_adapter(base: str):
    """A UNet with a peft LoRA of r=4, lora_alpha=8 (scale 2) on its attention projections, up factors random."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(base + "/unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    return unet


def _delta_scale(after: torch.Tensor, before: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """The scale s of a fused weight: after = before + s * up @ down."""
    ud = up @ down
    return float(((after - before) * ud).sum() / ud.pow(2).sum())


def test_a_unet_lora_saved_with_save_lora_adapter_or_beside_its_adapter_config_fuses_at_its_scale(tiny_models,
                                                                                                tmp_path):
    """diffusers' unet.save_lora_adapter writes unprefixed keys and the LoraConfig in the file's metadata; a raw
    peft state dict sits beside peft's adapter_config.json. Both were loaded as a state dict, which carries no
    metadata, and fused at scale 1 instead of lora_alpha / r (2 here): an audit of another model. Fused now at
    the scale diffusers' own load_lora_adapter gives; a broken adapter_config.json is named before any work."""
    import shutil

    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    base = tiny_models["latent_text"]
    unet = _unet_adapter(base)
    unet.save_lora_adapter(tmp_path / "adapter")
    file = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"
    factors = load_file(file)
    up, down = factors[f"{MODULE}.lora_B.weight"], factors[f"{MODULE}.lora_A.weight"]
    before = load_model(base).pipe.unet.state_dict()[f"{MODULE}.weight"]
    own = UNet2DConditionModel.from_pretrained(base + "/unet")  # diffusers' own load of that file
    own.load_lora_adapter(str(tmp_path / "adapter"), weight_name=file.name, prefix=None)
    own.fuse_lora()
    own.unload_lora()
    want = own.state_dict()[f"{MODULE}.weight"]
    assert _delta_scale(want, before, up, down) == pytest.approx(2.0, rel=1e-4)
    check_model_inputs(base, lora=str(tmp_path / "adapter"))
    got = load_model(base, lora=str(tmp_path / "adapter")).pipe.unet.state_dict()[f"{MODULE}.weight"]
    torch.testing.assert_close(got, want)

    # the raw peft state dict beside peft's adapter_config.json
    (tmp_path / "raw").mkdir()
    save_file(get_peft_model_state_dict(unet), tmp_path / "raw" / "adapter_model.safetensors")
    unet.peft_config["default"].save_pretrained(tmp_path / "raw")
    assert (tmp_path / "raw" / "adapter_config.json").is_file()
    got = load_model(base, lora=str(tmp_path / "raw")).pipe.unet.state_dict()[f"{MODULE}.weight"]
    torch.testing.assert_close(got, want)

    (tmp_path / "raw" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    with pytest.raises(ModelError, match=r"^model.lora=.*raw: .*adapter_config.json beside adapter_model.safetensors "
                                         r"is no peft LoraConfig .*it holds the LoRA's scale"):
        check_model_inputs(base, lora=str(tmp_path / "raw"))
    # neither: the scale cannot be known, and stays diffusers' 1 for such keys
    (tmp_path / "raw" / "adapter_config.json").unlink()
    shutil.rmtree(tmp_path / "adapter")
    got = load_model(base, lora=str(tmp_path / "raw")).pipe.unet.state_dict()[f"{MODULE}.weight"]
    assert _delta_scale(got, before, up, down) == pytest.approx(1.0, rel=1e-4)


def test_a_peft_save_pretrained_unet_lora_is_checked_and_fused_at_its_scale(tiny_models, other_base, tmp_path):
    """peft's PeftModel.save_pretrained of a UNet writes adapter_model.safetensors, keys
    base_model.model.<module>.lora_A.weight, with adapter_config.json beside it. It was refused for its own base
    as "trained on another base model" (the prefix read as part of each module's name). Its keys are the UNet's
    now, checked like the others, and it fuses to the weights peft's own merge_and_unload gives (scale 2)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    base = tiny_models["latent_text"]
    model = get_peft_model(UNet2DConditionModel.from_pretrained(base + "/unet"),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                      target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "peft")
    factors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert f"base_model.model.{MODULE}.lora_A.weight" in factors
    want = model.merge_and_unload().state_dict()[f"{MODULE}.weight"]
    check_model_inputs(base, lora=str(tmp_path / "peft"))
    tuned = load_model(base, lora=str(tmp_path / "peft")).pipe.unet.state_dict()
    torch.testing.assert_close(tuned[f"{MODULE}.weight"], want)
    before = load_model(base).pipe.unet.state_dict()[f"{MODULE}.weight"]
    up, down = factors[f"base_model.model.{MODULE}.lora_B.weight"], factors[f"base_model.model.{MODULE}.lora_A.weight"]
    assert _delta_scale(tuned[f"{MODULE}.weight"], before, up, down) == pytest.approx(2.0, rel=1e-4)
    with pytest.raises(ModelError, match=r"adapts 24 of its 32 unet modules that model.path's unet does not have "
                                         r"\(first: 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k'\)"):
        check_model_inputs(str(other_base), lora=str(tmp_path / "peft"))
