"""LoRA fine-tunes (model.lora): the low-rank weights diffusers' LoRA training scripts write,

    <output_dir>/pytorch_lora_weights.safetensors      (and checkpoint-<step>/ the same file)

loaded onto model.path's pipeline with diffusers' own `load_lora_weights`, then fused into the
weights (`fuse_lora`, `unload_lora_weights`), so the sampler runs a plain UNet: no adapter layers
on every call, and the same code path as a fully fine-tuned UNet (model.unet).

Why the checks: a LoRA of another base model loads without a word from diffusers and changes
nothing. Its module names match no module of this UNet; measured on the tiny SD layouts
(memex/tiny.py), 0 of the UNet's tensors changed and no warning was logged. An audit of it would
report the base model's memorization as the fine-tune's. So `check_lora` compares the tensors the
file names, under the names diffusers' load gives them (`diffusers_names`: kohya's lora_unet_*,
diffusers < 0.21's attn-processor names, today's `lora.down` and peft's `lora_A` keys), with the base's
modules from their configs, before any cluster work; `apply_lora` refuses a LoRA some of whose modules
the load dropped (a hub LoRA, a hub base: unchecked before), or that left every layer unchanged.
A LoRA of the text encoder (train_dreambooth_lora.py --train_text_encoder) is loaded and fused the
same way, onto the text encoder (peft 0.21 and transformers 5 load it; only transformers' own
add_adapter, which training uses, asks for peft >= 0.22).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from memex.models import HUB_ID, WEIGHT_SUFFIXES, ModelError, _local_slip, lycoris_kinds, safetensors_shapes

LORA_FILE = "pytorch_lora_weights.safetensors"
# key suffix -> which factor: "down" is (rank, in_features[, k, k]), "up" is (out_features, rank[, 1, 1]).
# lora_linear_layer: diffusers' names for a text encoder's attention projections (convert_state_dict_to_diffusers),
# what train_dreambooth_lora.py --train_text_encoder saves; they went unchecked
_FACTORS = {".lora.down.weight": "down", ".lora_A.weight": "down", ".lora_linear_layer.down.weight": "down",
            ".lora.up.weight": "up", ".lora_B.weight": "up", ".lora_linear_layer.up.weight": "up"}
COMPONENTS = ("unet", "text_encoder")  # the prefixes of diffusers' LoRA keys for an SD 1.x / IF pipeline


def is_local(lora: str) -> bool:
    return os.path.exists(lora) or not HUB_ID.match(lora)


def check_hub_shaped(lora: str) -> None:
    """A model.lora that is no file or folder here but reads as a hub id (`out/checkpoint-5000`,
    `runs/pytorch_lora_weights.safetensors`) was passed as one, and failed in every sampler actor
    after the index build: refused when its first part is a folder here holding a near name, or it names
    a weights file. A folder of the same name alone is no proof (a local latent-consistency/ beside
    the hub's latent-consistency/lcm-lora-sdv1-5): the load asks the hub then."""
    if is_local(lora):
        return
    slip = _local_slip(lora)
    if "did you mean" in slip or lora.endswith(WEIGHT_SUFFIXES):
        raise ModelError(f"model.lora={lora}: no such file or folder{slip or ''} (a hub LoRA is <user>/<repo>, "
                         f"without a file name; a local one is the folder holding {LORA_FILE}, or that file)")


def lora_file(lora: str) -> str:
    """model.lora (a folder holding the weights, or the .safetensors file) -> the file."""
    if os.path.isdir(lora):
        names = sorted(os.listdir(lora))
        if LORA_FILE in names:
            return os.path.join(lora, LORA_FILE)
        found = [n for n in names if n.endswith(".safetensors")]
        if len(found) == 1:
            return os.path.join(lora, found[0])
        if found:
            raise ModelError(f"model.lora={lora} holds several .safetensors files ({', '.join(found[:4])}): give "
                             "model.lora=<the file>")
        pickled = [n for n in names if n.endswith(".bin")]
        # a training run still going (or stopped early) has only its checkpoint-<step>/ folders
        from memex.checkpoints import CKPT_DIR  # (here: memex.checkpoints imports this module)

        steps = sorted((int(m[1]), n) for n in names if (m := CKPT_DIR.match(n))
                       and os.path.isfile(os.path.join(lora, n, LORA_FILE)))
        raise ModelError(f"model.lora={lora} holds no .safetensors file (diffusers' LoRA scripts write {LORA_FILE})"
                         + (f"; {pickled[0]} is pickle: convert it once with safetensors.torch.save_file"
                            if pickled else "")
                         + (f"; its checkpoint folders do ({', '.join(n for _, n in steps[-3:])}): set "
                            f"model.lora={os.path.join(lora, steps[-1][1])}" if steps else ""))
    if os.path.isfile(lora):
        if not lora.endswith(".safetensors"):
            raise ModelError(f"model.lora={lora} is not a .safetensors file (pickle LoRA weights: convert them once "
                             "with safetensors.torch.save_file)")
        return lora
    raise ModelError(f"model.lora={lora}: no such file or folder (the folder a LoRA training run wrote, holding "
                     f"{LORA_FILE})")


KOHYA = ("lora_unet_", "lora_te")  # kohya's key prefixes: diffusers converts those itself


def unprefixed(keys: Any) -> bool:
    """Keys with no `unet.`/`text_encoder.` prefix: diffusers' format before 0.21 (unet.save_attn_procs:
    `...attn1.processor.to_q_lora.down.weight`), a raw peft state dict of a UNet (unet.save_lora_adapter),
    or peft's PeftModel.save_pretrained of one (`base_model.model.<module>.lora_A.weight`). diffusers 0.42 loads
    only prefixed keys: these were dropped with a log line, and the LoRA refused as changing nothing."""
    keys = list(keys)
    return any("lora" in k.lower() for k in keys) and not any(
        k.startswith(tuple(c + "." for c in COMPONENTS)) or k.startswith(KOHYA) for k in keys)


def from_unprefixed(key: str) -> str:
    """An unprefixed UNet LoRA key in today's diffusers format:
    `mid_block...attn1.processor.to_out_lora.up.weight` -> `unet.mid_block...attn1.to_out.0.lora.up.weight`;
    peft's PeftModel.save_pretrained keys lose their `base_model.model.` (the UNet's own module names follow)."""
    k = key.removeprefix("base_model.model.").replace(".processor.", ".")
    for proj in ("to_q", "to_k", "to_v"):
        k = k.replace(f".{proj}_lora.", f".{proj}.lora.")
    return "unet." + k.replace(".to_out_lora.", ".to_out.0.lora.")


ADAPTER_CONFIG = "adapter_config.json"  # peft's save_pretrained writes it beside adapter_model.safetensors


def adapter_config(file: str) -> dict[str, Any] | None:
    """The LoraConfig an unprefixed LoRA was trained with (as a dict, diffusers' `metadata=`): its scale,
    lora_alpha / r (2.0 for r=4, lora_alpha=8), is in no key. diffusers' save_lora_adapter keeps it in the
    file's metadata (lora_adapter_metadata), peft's save_pretrained in adapter_config.json beside the file.
    None where neither is: the scale is 1, as diffusers loads such keys."""
    import json

    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    if raw:
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ModelError(f"{file}: its {LORA_ADAPTER_METADATA_KEY} metadata is not JSON ({e}): re-save the "
                             "adapter") from e
    folder = os.path.dirname(os.path.abspath(file))
    if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        return None
    from peft import LoraConfig

    try:
        return LoraConfig.from_pretrained(folder).to_dict()
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ModelError(f"{os.path.join(folder, ADAPTER_CONFIG)} beside {os.path.basename(file)} is no peft "
                         f"LoraConfig ({type(e).__name__}: {' '.join(str(e).split())[:200]}): it holds the LoRA's "
                         "scale (lora_alpha / r); fix it, or move the weights file away from it") from e


def diffusers_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A LoRA state dict under the names diffusers' load_lora_weights loads it by, renamed by diffusers' own
    conversions as that load renames it: kohya's lora_unet_*/lora_te_* (StableDiffusionLoraLoaderMixin.
    lora_state_dict), diffusers < 0.21's `processor.to_q_lora.down` names, today's `lora.down` and
    `lora_linear_layer.down`: all to `<component>.<module>.lora_A.weight` / `.lora_B.weight` (kohya's alphas go).
    The values only move (a kohya `.alpha` is read with .item()). Raises diffusers' ValueError for keys it
    cannot rename: the load raises it too."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if unprefixed(state_dict):
        state_dict = {from_unprefixed(k): v for k, v in state_dict.items()}
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(dict(state_dict))
    out = {k: v for k, v in state_dict.items() if not k.startswith(tuple(c + "." for c in COMPONENTS))}
    for comp in COMPONENTS:
        part = {k[len(comp) + 1:]: v for k, v in state_dict.items() if k.startswith(comp + ".")}
        if not part:
            continue
        part = (convert_unet_state_dict_to_peft(part) if comp == "unet"
                else convert_state_dict_to_peft(convert_state_dict_to_diffusers(part)))
        out.update({f"{comp}.{k}": v for k, v in part.items()})
    return out


def _factor(key: str) -> bool:
    """A LoRA factor's key in any of diffusers' spellings: lora_A, lora.down, lora_linear_layer.down,
    to_q_lora.down (and their up/B)."""
    return "lora" in key and key.endswith(("_A.weight", "_B.weight", "down.weight", "up.weight"))


def _adapted_modules(names: Any) -> list[str]:
    """`<component>.<module>` of each module the (diffusers_names) keys adapt: a lora_A or lora_B weight."""
    return sorted({_module_key(k.rsplit(".lora_", 1)[0]) for k in names if k.endswith((".lora_A.weight",
                                                                                        ".lora_B.weight"))})


def _module_key(name: str) -> str:
    """`<component>.<module>` with the text encoder's module named either way (_module)."""
    comp, _, module = name.partition(".")
    return f"{comp}.{_module(module)}"


def check_lora(lora: str, shapes_of: Callable[[str], dict[str, tuple[int, ...]] | None]) -> None:
    """A local model.lora against the base, without reading weights: a readable safetensors header
    with LoRA tensors, each adapting a module the base has, with matching features.
    `shapes_of(component)`: that component's state-dict shapes, None where it cannot tell."""
    check_hub_shaped(lora)
    if not is_local(lora):
        return  # a hub id: checked when loaded (this machine may not reach the hub)
    file = lora_file(lora)
    try:
        tensors = safetensors_shapes(file)
    except ModelError as e:
        raise ModelError(f"model.lora={lora}: {e}") from e
    kinds = lycoris_kinds(tensors)
    if kinds:  # it failed on every sampler actor, after the run folder was claimed
        raise ModelError(f"model.lora={lora}: {file} is a LyCORIS {' and '.join(kinds)} adapter, not a LoRA: "
                         "diffusers cannot load it. Merge it into the base's UNet once (LyCORIS's merge script, or "
                         "a model merge in ComfyUI or A1111, saved as a diffusers folder) and give that UNet as "
                         "model.unet")
    if not any("lora" in k.lower() for k in tensors):
        raise ModelError(f"model.lora={lora}: {file} holds no LoRA tensors (no lora_A/lora_B or lora.down/lora.up "
                         "keys): a fully fine-tuned UNet goes in model.unet")
    # the names the load gives them: kohya's and diffusers < 0.21's went unchecked (no _FACTORS suffix), and
    # one of another base loaded its few modules whose names matched (8 of 32 on the tiny layouts), or failed
    # only in every sampler actor. A value: (the file's key, its shape); a kohya alpha its number for .item()
    import torch

    try:
        named = diffusers_names({k: torch.zeros(shape) if k.endswith(".alpha") else (k, shape)
                                 for k, shape in tensors.items()})
    except ValueError as e:
        raise ModelError(f"model.lora={lora}: diffusers cannot read {file}'s keys ({' '.join(str(e).split())[:200]}): "
                         "not a LoRA format diffusers loads") from e
    named = {k: v for k, v in named.items() if isinstance(v, tuple)}
    if unprefixed(tensors):
        try:  # read before any work: its scale
            adapter_config(file)
        except ModelError as e:
            raise ModelError(f"model.lora={lora}: {e}") from e
    other = sorted((k.split(".", 1)[0], key) for k, (key, _) in named.items()
                   if not k.startswith(tuple(c + "." for c in COMPONENTS)) and _factor(k))
    if other:  # e.g. SDXL's text_encoder_2: load_lora_weights of an SD 1.x / IF pipeline drops them unsaid
        raise ModelError(f"model.lora={lora} adapts modules of {other[0][0]} (first tensor: {other[0][1]!r}), which "
                         f"model.path's pipeline does not have (it loads LoRAs of {' and '.join(COMPONENTS)} only): a "
                         "LoRA of another kind of model (SDXL?); give model.path the base it was trained on")
    for comp in COMPONENTS:
        rows = [(key, k[len(comp) + 1: -len(s)], _FACTORS[s], shape) for k, (key, shape) in sorted(named.items())
                for s in _FACTORS if k.startswith(comp + ".") and k.endswith(s)]
        have = shapes_of(comp) if rows else None
        if not have:
            continue
        have = {_module(k): v for k, v in have.items()}
        modules = sorted({m for _, m, _, _ in rows})
        missing = [m for m in modules if _module(m) + ".weight" not in have]
        if missing:
            raise ModelError(f"model.lora={lora} adapts {len(missing)} of its {len(modules)} {comp} modules that "
                             f"model.path's {comp} does not have (first: {missing[0]!r}): a LoRA trained on another "
                             "base model; give model.path the base it was trained on")
        for key, module, factor, shape in rows:
            weight = have[_module(module) + ".weight"]
            fits = len(shape) >= 2 and len(weight) >= 2 and (
                shape[1] == weight[1] if factor == "down" else shape[0] == weight[0])
            if not fits:
                raise ModelError(f"model.lora={lora}: tensor {key!r} has shape {list(shape)} but model.path's "
                                 f"{comp} {module}.weight is {list(weight)}: a LoRA trained on another base model")


def _module(name: str) -> str:
    """A text encoder module's name either way: LoRA files say text_model.encoder.layers.0..., as
    CLIPTextModel's state dict did before transformers 5, which names it encoder.layers.0..."""
    return name.removeprefix("text_model.")


def _lora_layers(pipe: Any) -> list[Any]:
    """The adapter layers load_lora_weights injected (peft's LoraLayer: a `lora_B` per adapter)."""
    return [m for c in COMPONENTS if getattr(pipe, c, None) is not None
            for m in getattr(pipe, c).modules() if hasattr(m, "lora_B") and len(getattr(m, "lora_B", ())) > 0]


def apply_lora(pipe: Any, lora: str, path: str) -> None:
    """Load model.lora onto `pipe` and fuse it into the weights; refuse one that changes none."""
    try:
        if is_local(lora):
            file = lora_file(lora)
            if unprefixed(safetensors_shapes(file)):  # given to diffusers with today's keys (unprefixed())
                from safetensors.torch import load_file

                # as load_lora_weights loads a UNet's part, with the scale the file's metadata or its
                # adapter_config.json give (a dict carries no metadata: these fused at scale 1, not lora_alpha / r)
                config = adapter_config(file)
                pipe.load_lora_into_unet({from_unprefixed(k): v for k, v in load_file(file).items()},
                                         network_alphas=None, unet=pipe.unet, _pipeline=pipe,
                                         metadata=None if config is None else {f"unet.{k}": v for k, v in
                                                                               config.items()})
            else:
                # a bare file name's dirname is "": diffusers then reads it as a hub id (absolute: its folder)
                file = os.path.abspath(file)
                pipe.load_lora_weights(os.path.dirname(file), weight_name=os.path.basename(file))
        else:
            pipe.load_lora_weights(lora)
            hub_keys = list(type(pipe).lora_state_dict(lora)[0])  # its file, from the cache the load just filled
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised naming both settings
        raise ModelError(f"could not load model.lora={lora} onto model.path={path} ({type(pipe).__name__}): "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    layers = _lora_layers(pipe)
    if layers:  # every module the file adapts: one of another base loaded the few whose names matched (8 of 32)
        import torch

        names = safetensors_shapes(lora_file(lora)) if is_local(lora) else hub_keys
        wanted = _adapted_modules(diffusers_names({k: torch.zeros(()) for k in names}))  # (kohya's alpha: .item())
        loaded = {_module_key(f"{c}.{n}") for c in COMPONENTS if getattr(pipe, c, None) is not None
                  for n, m in getattr(pipe, c).named_modules() if len(getattr(m, "lora_B", ())) > 0}
        dropped = [m for m in wanted if m not in loaded]
        if dropped:
            raise ModelError(f"model.lora={lora}: diffusers loaded {len(wanted) - len(dropped)} of the {len(wanted)} "
                             f"modules it adapts into model.path={path}; the others are no module of it (first: "
                             f"{dropped[0]!r}): a LoRA trained on another base model, whose audit would report "
                             "mostly the base's memorization; give model.path the base it was trained on")
    if not layers:
        keys = sorted(safetensors_shapes(lora_file(lora))) if is_local(lora) else []
        prefixes = sorted({k.split(".", 1)[0] for k in keys})
        raise ModelError(f"model.lora={lora}: diffusers loaded none of its tensors into model.path={path}"
                         + (f" (its keys begin {', '.join(prefixes[:5])}; diffusers reads unet.*, text_encoder.* "
                            "and kohya's lora_unet_*/lora_te_*)" if prefixes else "")
                         + ": a LoRA of another kind of model, or of another base")
    if not any(b.weight.detach().abs().sum() > 0 for m in layers for b in m.lora_B.values()):
        raise ModelError(f"model.lora={lora} changes no weight of model.path={path}: its up (B) factor is zero on "
                         f"every one of the {len(layers)} layers it was loaded into (saved before any training "
                         "step?)")
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
