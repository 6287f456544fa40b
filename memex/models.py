"""Load a diffusion checkpoint with diffusers' own `DiffusionPipeline.from_pretrained`.

A local folder is checked first, so a missing or malformed checkpoint fails with a message that
names the missing piece instead of a deep diffusers traceback: `check_model_inputs` runs in the
driver before any cluster work (audit, generate) and again in `load_model`. It reads no weights:
  * every safetensors file a load would read has a readable header whose tensors fit in the file
    (a truncated download or random bytes fail here, naming the file);
  * the header's tensor shapes agree with the component's config.json (the model is built on the
    `meta` device, no memory, and its state_dict shapes compared);
  * pickle-only weights (diffusion_pytorch_model.bin, pytorch_model.bin: torch.load runs code) are
    refused unless model.allow_pickle=true; then they are read with torch.load(weights_only=True),
    here (on `meta`) and by diffusers/transformers at load time.
Hub ids: the checks run on the snapshot in the local Hugging Face cache when there is one (only the
components it holds); otherwise they are deferred to the load, since this machine may not reach
the hub, and the load refuses pickle-only weights itself (use_safetensors=True).
The model family decides how `memex.sampling` drives the components:

    unconditional  UNet2DModel                       (DDPMPipeline layout)
    latent_text    UNet2DConditionModel + VAE        (StableDiffusionPipeline layout)
    pixel_text     UNet2DConditionModel, no VAE      (IFPipeline layout)

A UNet that needs more than the noise and a prompt (SDXL's added conditioning, an inpainting
UNet's image channels, class labels) and a pipeline without a UNet (DiT, SD 3, Flux) are refused
from their configs (`check_sampled_unet`), before any cluster work and again on the loaded UNet.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from memex.config import ConfigError, MemexError, ModelKind, SchedulerKind
from memex.console import library_logs_to_file

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
NEEDED = {
    ModelKind.unconditional: ("unet", "scheduler"),
    ModelKind.latent_text: ("unet", "scheduler", "vae", "text_encoder", "tokenizer"),
    ModelKind.pixel_text: ("unet", "scheduler", "text_encoder", "tokenizer"),
}


class ModelError(MemexError, ValueError):
    """The checkpoint is missing, malformed or not the configured kind."""


@dataclass
class LoadedModel:
    pipe: Any  # a diffusers DiffusionPipeline
    kind: ModelKind
    model_id: str  # the path or hub id it was loaded from (+ the model.unet override, if any)
    path: str = ""  # model.path: what error messages name


def ray_gpus() -> list | None:
    """The GPU ids Ray assigned this worker (a task or actor), or None outside one (the driver, no Ray)."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized() or ray._private.worker.global_worker.mode != ray.WORKER_MODE:
        return None
    return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))


def resolve_device(requested: str) -> str:
    """resources.device: "auto" -> cuda when a GPU is visible to this process, else cpu. "cuda" with
    none visible fails naming the key (it was torch's "Torch not compiled with CUDA enabled" from
    the first .to()). A Ray worker that asked for no GPU (resources.num_gpus=0) runs on the CPU: Ray
    2.60 no longer hides a node's GPUs from it (CUDA_VISIBLE_DEVICES is left as it was, ray #54868),
    so "auto" took a GPU Ray had not reserved, several actors to one GPU, and ran it out of memory."""
    import torch

    if ray_gpus() == []:  # a Ray worker given no GPU
        if requested == "cuda":
            raise ConfigError("resources.device=cuda, but Ray gave this worker no GPU (resources.num_gpus=0): set "
                              "resources.num_gpus=1 (resources=gpu), or resources.device=auto to run on the CPU")
        return "cpu"
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES") == ""
        why, fix = (("torch here is a CPU build", "install a CUDA build of torch (docker/Dockerfile)")
                    if torch.version.cuda is None else
                    ('CUDA_VISIBLE_DEVICES=""', "set resources.num_gpus=1: Ray shows a worker the GPUs it asks for")
                    if hidden else ("torch finds no CUDA device", "run it on a GPU node"))
        raise ConfigError(f"resources.device=cuda, but this worker sees no GPU ({why}): {fix}, "
                          "or set resources.device=auto (a GPU where one is visible, else the CPU)")
    return requested


def _nearby_pipelines(path: str, key: str) -> str:
    """The likely slips: a component folder (unet/) of a pipeline, or a folder of pipelines."""
    parent = os.path.dirname(os.path.normpath(path))
    if os.path.isfile(os.path.join(parent, "model_index.json")):
        return (f" but the {os.path.basename(os.path.normpath(path))} component of one: set {key}={parent}, "
                "the pipeline folder")
    inside = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "model_index.json")))
    if inside:
        return (f"; it holds {len(inside)} pipeline folder(s): {', '.join(inside[:5])}"
                f" (set {key}={os.path.join(path, inside[0])}, say)")
    return " (save one with pipeline.save_pretrained(path))"


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _convert_hint(path: str, key: str) -> str:
    """How to turn a single-file checkpoint into the pipeline folder memex reads (once, on a machine
    with the hub at hand: from_single_file fetches the matching configs; offline, pass it
    config=<a diffusers folder of the same architecture>)."""
    out = os.path.splitext(path)[0] + "-diffusers"
    return (f"convert it once with python -c \"from diffusers import StableDiffusionPipeline as P; "
            f"P.from_single_file('{path}').save_pretrained('{out}')\" and set {key}={out} (from_single_file reads "
            "the matching configs from the hub; offline, add config='<a diffusers folder of the same family>')")


# LyCORIS adapters other than LoRA, by a tensor-name suffix: kohya-style files (lora_unet_...) that
# diffusers' load_lora_weights cannot load ("The following keys have not been correctly renamed").
LYCORIS = {".hada_w1_a": "LoHa", ".lokr_w1": "LoKr", ".lokr_w1_a": "LoKr", ".oft_blocks": "OFT",
           ".oft_diag": "OFT", ".diff": "full-difference", ".diff_b": "full-difference"}


def lycoris_kinds(tensor_names) -> list[str]:
    """The LyCORIS adapter kinds (LoHa, LoKr, ...) whose tensors a file names, sorted; [] for none."""
    return sorted({kind for k in tensor_names for suffix, kind in LYCORIS.items() if k.endswith(suffix)})


def weights_file_kind(path: str) -> str:
    """What a lone weights file holds, from its safetensors header (no tensor is read): "lycoris" (a
    LyCORIS adapter that is no LoRA: LoHa, LoKr, ...), "lora" (any
    LoRA format: diffusers', peft's, kohya's `lora_unet_*`), "single_file" (the original Stable
    Diffusion layout: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`), or
    "other"; a pickle (.ckpt, .pt, .bin) is not opened: "lora" by its name, else "single_file", what
    such files mostly are. Raises ModelError for an unreadable safetensors file."""
    if not path.endswith(".safetensors"):
        return "lora" if "lora" in os.path.basename(path).lower() else "single_file"  # pytorch_lora_weights.bin
    keys = list(safetensors_shapes(path))
    if lycoris_kinds(keys):
        return "lycoris"
    if any("lora" in k.lower() for k in keys):
        return "lora"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "single_file"
    return "other"


COMPONENT_KEYS = {"model.unet": "a UNet folder", "model.text_encoder": "a text encoder folder"}


def _file_instead_of_folder(path: str, key: str) -> str:
    """Why a file was given where a pipeline (or UNet) folder belongs, and the fix: the folder a
    weights or config file sits in, a LoRA (model.lora), a single-file checkpoint (A1111/ComfyUI,
    kohya: the original layout, `model.diffusion_model.*` keys) to convert once."""
    name, parent = os.path.basename(path), os.path.dirname(os.path.abspath(path))
    component = key in COMPONENT_KEYS  # a component override: its own folder, not a pipeline's
    want = COMPONENT_KEYS.get(key, "a diffusers pipeline folder")
    component_file = re.match(rf"({'|'.join(sorted(set(SAFE_STEMS + PICKLE_STEMS)))})(\.|-\d+-of-\d+)", name)
    if name == "model_index.json" or (name == "config.json" or component_file) and any(
            os.path.isfile(os.path.join(parent, f)) for f in ("config.json", "model_index.json")):
        top = os.path.dirname(parent)
        if not component and not os.path.isfile(os.path.join(parent, "model_index.json")) \
                and os.path.isfile(os.path.join(top, "model_index.json")):
            parent = top  # the weights of a component (unet/): its pipeline is one folder up
        return f"{key}={path} is a file of one, not the folder: set {key}={parent}"
    if not name.endswith(SINGLE_FILE_SUFFIXES):
        return f"{key}={path} is a file, not {want}"
    try:
        kind = weights_file_kind(path)
    except ModelError as e:
        return f"{key}={path} is a file, not {want}, and not a readable checkpoint either: {e}"
    if kind == "lora":
        return (f"{key}={path} is a LoRA file: set model.lora={path} and {key} to the model it was trained on "
                "(memex fuses the LoRA into it)")
    if kind == "lycoris":
        return (f"{key}={path} is a LyCORIS adapter (LoHa, LoKr, ...), not {want}, nor a LoRA diffusers loads: merge "
                "it into its base's UNet once, save a diffusers folder, and give that")
    if kind == "other":
        return f"{key}={path} is a weights file, not {want} (its tensors are not a Stable Diffusion checkpoint's)"
    return (f"{key}={path} is a single-file checkpoint (the original Stable Diffusion layout, as A1111, ComfyUI "
            f"and kohya save them), not {want}: {_convert_hint(path, 'model.path' if component else key)}")


def model_json(path: str, name: str) -> dict | None:
    """`name` (a JSON file: model_index.json, memex_train.json) of the model folder at `path`, local or any
    fsspec URI; None when absent or unreadable (or a hub id: the check is then left to the load)."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path)
        file = root.rstrip("/") + "/" + name
        return json.loads(fs.cat_file(file)) if fs.exists(file) else None
    except (OSError, ValueError):
        return None


def check_local_checkpoint(path: str, key: str = "model.path") -> dict:
    """Validate a local diffusers folder without loading weights; return its model_index.json.
    `key`: the setting `path` came from, which errors name (nightly.base_model too)."""
    if os.path.isfile(path):
        raise ModelError(_file_instead_of_folder(path, key))
    if not os.path.isdir(path):
        raise ModelError(
            f"{key}={path}: no such folder"
            + ("" if not HUB_ID.match(path) else " (and not found as a hub id either)")
        )
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ModelError(f"{key}={path} has no model_index.json: not a diffusers pipeline folder"
                         f"{_nearby_pipelines(path, key)}")
    try:
        with open(index_file) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{index_file} is not valid JSON: {e}") from e
    for name, spec in index.items():
        # UNUSED_COMPONENTS are passed as None, never read: a folder trimmed of SD 1.5's 1.2 GB safety checker loads
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or name in UNUSED_COMPONENTS:
            continue
        sub = os.path.join(path, name)
        if not os.path.isdir(sub):
            raise ModelError(f"{key}={path}: model_index.json lists component {name!r} "
                             f"but folder {sub} is missing")
        files = os.listdir(sub)
        if name in ("unet", "vae", "text_encoder"):
            if not any(f.endswith(".json") for f in files):
                raise ModelError(f"component {name!r} in {sub} has no config.json")
            if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
                raise ModelError(f"component {name!r} in {sub} has no weights (*.safetensors)")
        if name == "scheduler" and "scheduler_config.json" not in files:
            # the noise schedule the model was trained with: without it every pre-cluster scheduler check
            # passed silently (check_scheduler reads no config) and every sampler's load failed
            raise ModelError(f"{key}={path}: component 'scheduler' in {sub} has no scheduler_config.json (the "
                             "model's noise schedule): copy it from where the model came from, or re-save the "
                             "pipeline with save_pretrained")
    return index


def check_unet_folder(path: str) -> str:
    """Validate a standalone UNet folder (model.unet); return its class name from config.json."""
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(path):
        raise ModelError(_file_instead_of_folder(path, "model.unet"))
    if not os.path.isdir(path):
        raise ModelError(f"model.unet={path}: no such folder (a UNet folder saved with unet.save_pretrained, "
                         "e.g. a trainer's checkpoint-<step>/unet)")
    if not os.path.isfile(cfg_file):
        raise ModelError(f"model.unet={path} has no config.json: give a UNet folder saved with unet.save_pretrained "
                         "(a trainer's checkpoint-<step>/unet)")
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in os.listdir(path)):
        raise ModelError(f"model.unet={path} has no weights (*.safetensors or *.bin)")
    try:
        with open(cfg_file) as f:
            cls = json.load(f).get("_class_name")
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file} is not valid JSON: {e}") from e
    if cls not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ModelError(f"model.unet={path} holds a {cls}, not a UNet2DModel or UNet2DConditionModel")
    return cls


# ---- weights, checked without reading them -------------------------------------------------
# Weight file stems: diffusers models, transformers models (safetensors), transformers (pickle).
SAFE_STEMS = ("diffusion_pytorch_model", "model")
PICKLE_STEMS = ("diffusion_pytorch_model", "pytorch_model")
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2,
               "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "C64": 8, "U64": 8, "I64": 8, "F64": 8}
PICKLE_FIX = ("set model.allow_pickle=true to load them with torch.load(weights_only=True), or convert them once "
              "with model.save_pretrained(folder, safe_serialization=True)")


def _pick(folder: str, names: list[str], ext: str, stems: tuple[str, ...], loose: bool) -> list[str]:
    """The files of one format a load reads: <stem><ext>, else the shards its index lists, else
    (`loose`) any *<ext>: a variant or oddly named file, whose header is still worth checking."""
    for stem in stems:
        if stem + ext in names:
            return [os.path.join(folder, stem + ext)]
    for stem in stems:
        if f"{stem}{ext}.index.json" in names:
            index = os.path.join(folder, f"{stem}{ext}.index.json")
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ModelError(f"{index} is not a valid shard index ({type(e).__name__}: {e}): "
                                 "re-save the component with save_pretrained") from e
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise ModelError(f"{index} lists shards that are missing: {missing[:3]} (an incomplete copy?)")
            return [os.path.join(folder, s) for s in shards]
    return sorted(os.path.join(folder, n) for n in names if n.endswith(ext)) if loose else []


def _variant_of(name: str, stems: tuple[str, ...], ext: str) -> str | None:
    """"fp16" for diffusion_pytorch_model.fp16.safetensors or model.fp16-00001-of-00002.safetensors
    (a diffusers weight variant), else None."""
    for stem in stems:
        if name.startswith(stem + ".") and name.endswith(ext):
            label = re.sub(r"-\d{5}-of-\d{5}$", "", name[len(stem) + 1: -len(ext)])
            if label and "." not in label:
                return label
    return None


def has_variant(folder: str, variant: str) -> bool:
    """Whether a component folder holds weight files of `variant` (diffusers reads them when asked)."""
    return any(_variant_of(n, SAFE_STEMS + PICKLE_STEMS, ext) == variant
               for n in os.listdir(folder) for ext in WEIGHT_SUFFIXES)


def weight_files(folder: str, variant: str | None = None) -> tuple[str, list[str]]:
    """("safetensors" | "pickle" | "none", files) a from_pretrained of this component folder reads,
    in the loaders' order: the `variant`'s files if it is set and the folder has them (diffusers
    falls back to the standard files per component), the standard safetensors name (or its
    shards), the standard .bin name (or its shards), then any other *.safetensors, any other *.bin.
    Without `variant`, a folder holding only variant files is refused: the load would find none."""
    names = sorted(os.listdir(folder))
    formats = (("safetensors", ".safetensors", SAFE_STEMS), ("pickle", ".bin", PICKLE_STEMS))
    for fmt, ext, stems in formats if variant else ():
        files = [os.path.join(folder, n) for n in names if _variant_of(n, stems, ext) == variant]
        if files:
            return fmt, files
    for loose in (False, True):
        for fmt, ext, stems in formats:
            files = _pick(folder, names, ext, stems, loose)
            labels = {_variant_of(os.path.basename(f), stems, ext) for f in files}
            if files and loose and None not in labels:
                found = ", ".join(sorted(labels))
                raise ModelError(f"{folder} has only the {found} variant of its weights "
                                 f"({', '.join(os.path.basename(f) for f in files[:3])}), which a load reads only "
                                 f"when asked: set model.variant={sorted(labels)[0]}")
            if files:
                return fmt, files
    return "none", []


def loaded_weight_files(path: str, unet: str | None = None, lora: str | None = None,
                        text_encoder: str | None = None, variant: str | None = None) -> list[tuple[str, str]]:
    """(name, file) of every weight file a load of this model reads, from local folders: each model_index.json
    component's `weight_files` (the overrides' in place of the base's unet and text_encoder; UNUSED_COMPONENTS
    never read), and the LoRA's file. A part given as a hub id is left out (its name is in the settings); []
    when nothing is local."""
    from memex.lora import lora_file

    out: list[tuple[str, str]] = []
    replaced = {k for k, v in (("unet", unet), ("text_encoder", text_encoder)) if v}
    if os.path.isdir(path):
        index = model_json(path, "model_index.json")
        skip = {*UNUSED_COMPONENTS, *replaced}
        parts = [k for k, spec in sorted(index.items()) if not k.startswith("_") and k not in skip
                 and isinstance(spec, list) and spec[0] is not None] if index is not None else [""]
        for k in parts:
            folder = os.path.join(path, k)
            if os.path.isdir(folder):
                out += [("/".join(filter(None, ("base", k, os.path.basename(f)))), f)
                        for f in weight_files(folder, variant)[1]]
    for key, folder in (("unet", unet), ("text_encoder", text_encoder)):
        if folder and os.path.isdir(folder):
            out += [(f"{key}/{os.path.basename(f)}", f) for f in weight_files(folder, variant)[1]]
    if lora and os.path.exists(lora):
        f = lora_file(lora)
        out.append((f"lora/{os.path.basename(f)}", f))
    return out


def safetensors_metadata(file: str) -> dict[str, str]:
    """A safetensors file's `__metadata__` (kohya's sd-scripts: ss_steps, ss_epoch, ...), {} for none."""
    meta = _safetensors_header(file)[0].get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def _safetensors_header(file: str) -> tuple[dict, int, int]:
    """(header, file size, header length): the 8-byte little-endian length and the JSON it gives."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > MAX_HEADER:
            raise ModelError(f"{file} is not a safetensors file ({size} bytes; its first 8 bytes do not give a header "
                             "length): a corrupt or truncated download? re-download or re-save it")
        if n > size - 8:
            raise ModelError(f"{file} is truncated: its header alone claims {n} bytes but the file has {size} "
                             "(an interrupted download or copy? re-download or re-save it)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{file} is not a safetensors file (unreadable header: {type(e).__name__}: {e}): "
                         "re-download or re-save it") from e
    return header, size, n


def safetensors_shapes(file: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (8-byte little-endian length + JSON), after
    checking that every tensor's bytes lie inside the file: a truncated file fails here, naming it."""
    header, size, n = _safetensors_header(file)
    data = size - 8 - n
    shapes, end = {}, 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{file}: tensor {name!r} has a malformed header entry {spec!r}: re-save the file") from e
        count = 1
        for d in shape:
            count *= d
        if dtype in DTYPE_BYTES and b - a != count * DTYPE_BYTES[dtype]:
            raise ModelError(f"{file}: tensor {name!r} ({dtype} {list(shape)}) needs {count * DTYPE_BYTES[dtype]} "
                             f"bytes but its offsets give {b - a}: a corrupt file, re-save it")
        shapes[name], end = shape, max(end, b)
    if end > data:
        raise ModelError(f"{file} is truncated: its header places tensor data up to byte {8 + n + end} but the file "
                         f"has {size} bytes (an interrupted download or copy? re-download or re-save it)")
    from safetensors import SafetensorError, safe_open  # anything else the format forbids (overlaps, gaps)

    try:
        with safe_open(file, "pt"):
            pass
    except SafetensorError as e:
        raise ModelError(f"{file} is not a valid safetensors file: {e} (re-download or re-save it)") from e
    return shapes


def pickle_shapes(file: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a pickled state dict, read with torch.load(weights_only=True) onto
    the `meta` device: no tensor data is read, and a pickle that would run code is refused."""
    import pickle

    import torch

    try:
        sd = torch.load(file, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(f"{file} is refused: its pickle holds more than tensors (torch.load(weights_only=True): "
                         f"{' '.join(str(e).split())[:300]}); do not load it, or convert it where you trust it") from e
    except Exception as e:  # noqa: BLE001 - truncated zip, not a pickle at all
        raise ModelError(f"{file} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}): a corrupt or "
                         "truncated file? re-download or re-save it") from e
    if not isinstance(sd, dict):
        raise ModelError(f"{file} holds a {type(sd).__name__}, not a state dict of tensors")
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def model_shapes(folder: str, library: str, class_name: str) -> dict[str, tuple[int, ...]] | None:
    """State-dict shapes of `class_name` built from `folder`'s config.json on the `meta` device
    (accelerate.init_empty_weights: no memory, no weights). None for a class memex cannot name."""
    model = _meta_model(folder, library, class_name)
    return None if model is None else {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_model(folder: str, library: str, class_name: str) -> Any:
    """`class_name` built from `folder`'s config.json on the `meta` device, or None for a class memex cannot name."""
    from accelerate import init_empty_weights

    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name, None)
        if cls is None:
            return None
        build = lambda: cls.from_config(cls.load_config(folder))  # noqa: E731
    elif library == "transformers":
        import transformers

        cls = getattr(transformers, class_name, None)
        if cls is None or getattr(cls, "config_class", None) is None:
            return None
        build = lambda: cls(cls.config_class.from_pretrained(folder))  # noqa: E731
    else:
        return None
    try:
        with init_empty_weights():
            return build()
    except Exception as e:  # noqa: BLE001 - re-raised naming the config
        raise ModelError(f"{folder}/config.json does not build a {class_name}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from e


def check_component_weights(folder: str, library: str, class_name: str, key: str,
                            allow_pickle: bool = False, variant: str | None = None) -> None:
    """One component folder (unet, vae, text_encoder, ...): its weight files readable, shaped as its
    config says and holding every tensor it needs. `key` (model.path=..., model.unet=...) is what the
    messages name."""
    try:
        fmt, files = weight_files(folder, variant)
    except ModelError as e:
        raise ModelError(f"{key}: {e}") from e
    if fmt == "none":
        return  # check_local_checkpoint / check_unet_folder require weights where they are needed
    if fmt == "pickle" and not allow_pickle:
        raise ModelError(f"{key}: {folder} has only pickle weights ({', '.join(os.path.basename(f) for f in files)}), "
                         f"which torch.load can make run code: {PICKLE_FIX}")
    read = safetensors_shapes if fmt == "safetensors" else pickle_shapes
    found: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    try:
        for f in files:
            shapes = read(f)
            found.update(shapes)
            where.update(dict.fromkeys(shapes, f))
        model = _meta_model(folder, library, class_name)
    except ModelError as e:  # the message names the file; the key says which setting points at it
        raise ModelError(f"{key}: {e}") from e
    if model is None:
        return
    # Shapes over the tensors both sides name. A text encoder saved with transformers 4 names
    # text_model.encoder..., which transformers 5 builds as encoder...: compared without that prefix
    # (as lora._module does), else no name met and no shape was compared at all.
    expected = {_unprefixed(k): tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [(k, found[k], expected[_unprefixed(k)]) for k in sorted(found)
             if _unprefixed(k) in expected and found[k] != expected[_unprefixed(k)]]
    if wrong:
        k, got, want = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ModelError(f"{key}: tensor {k!r} in {where[k]} has shape {list(got)} but {folder}/config.json makes "
                         f"a {class_name} that needs {list(want)}{more}: the weights and config.json are from "
                         "different models (re-save the component with save_pretrained)")
    # Then the tensors the class needs that no file holds: transformers gave them fresh random values
    # on every load, logging it only (each sampler actor a different text encoder), diffusers failed
    # in every actor with "Cannot copy out of meta tensor", naming nothing.
    missing = _missing_tensors(model, library, list(found))
    if missing:
        names = ", ".join(repr(k) for k in missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3
                                                            else "")
        held = ", ".join(os.path.basename(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        effect = ("transformers fills them with fresh random values on every load, so each sampler differs" if
                  library == "transformers" else "the load fails in every sampler")
        raise ModelError(f"{key}: {folder}'s weights ({held}) lack {len(missing)} of the {len(model.state_dict())} "
                         f"tensors its config.json's {class_name} needs: {names} ({effect}): an incomplete copy or "
                         "download? re-download it, or re-save the component with save_pretrained")


def _missing_tensors(model: Any, library: str, names: list[str]) -> list[str]:
    """The state-dict names of `model` (built on `meta`) that a from_pretrained would not fill from checkpoint
    tensors named `names`, after the renames the installed loader makes, less what it derives or may lack."""
    expected = model.state_dict()
    # a missing buffer keeps the value the class computes (init_empty_weights puts parameters alone on
    # `meta`; transformers recomputes position_ids, inv_freq): only parameters count
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    if library == "diffusers":
        # old checkpoints' attention blocks (query/key/value/proj_attn, diffusers < 0.15) are renamed to
        # to_q/to_k/to_v/to_out.0 at load (diffusers does it for an unsharded checkpoint; renamed here for
        # any, leniently: a sharded one under the old names is left to the load, as before)
        held = dict.fromkeys(names)
        fix = getattr(model, "_fix_state_dict_keys_on_load", None) or getattr(
            model, "_convert_deprecated_attention_blocks", None)
        if fix is not None:
            fix(held)
        return sorted(k for k in expected if k in params and k not in held)
    have = _transformers_names(model, names, expected)
    # tied weights (T5's encoder.embed_tokens.weight is shared.weight) are set from whichever of the group
    # the checkpoint holds; transformers 5 maps target -> source, transformers 4 lists the targets
    tied = getattr(model, "all_tied_weights_keys", None)
    optional = set()
    if isinstance(tied, dict):
        groups: dict[str, set[str]] = {}
        for target, source in tied.items():
            groups.setdefault(source, {source}).add(target)
        for group in groups.values():
            if group & have:
                have |= group
    else:
        optional |= {k for k in expected for pat in getattr(model, "_tied_weights_keys", None) or ()
                     if re.search(pat, k)}
    optional |= {k for k in expected for pat in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()
                 if re.search(pat, k)}
    return sorted(k for k in expected if k in params and k not in have and k not in optional)


def _transformers_names(model: Any, names: list[str], expected: dict) -> set[str]:
    """The model names transformers loads checkpoint tensors `names` into: transformers 5's conversion
    mapping (text_model. prefixes, LayerNorm gamma/beta, ...) and base_model_prefix, as
    convert_and_load_state_dict_in_model renames them; where that API is not there (transformers 4),
    the same renames by hand, leniently (a name either way counts)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        out = set()
        for name in names:
            renamed, _ = rename_source_key(name, renamings, converters, prefix, expected)
            if renamed not in expected and name in expected:
                renamed, _ = rename_source_key(name, [], [], base_model_prefix=prefix, meta_state_dict=expected)
            out.add(renamed)
        return out
    except Exception:  # noqa: BLE001 - transformers 4 (no conversion mapping) or a changed API
        pass
    forms = {_loose_name(k, prefix): k for k in expected}
    return {forms[n] for n in (_loose_name(n, prefix) for n in names) if n in forms}


def _loose_name(name: str, prefix: str) -> str:
    """A tensor name with the renames transformers 4 makes at load undone both ways: LayerNorm gamma/beta,
    the base model prefix, a CLIP text encoder's text_model."""
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if prefix:
        name = name.removeprefix(prefix + ".")
    return _unprefixed(name)


def _unprefixed(name: str) -> str:
    """A CLIP text encoder's tensor name either way: text_model.encoder... (transformers 4), encoder... (5)."""
    return name.removeprefix("text_model.")


def _components(path: str, index: dict, skip: set[str]) -> list[tuple[str, str, str]]:
    """(folder, library, class) of every model_index.json component with a folder of its own."""
    out = []
    for name, spec in sorted(index.items()):
        if name.startswith("_") or name in skip or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        if os.path.isdir(os.path.join(path, name)):
            out.append((os.path.join(path, name), spec[0], spec[1]))
    return out


def _hub_offline() -> bool:
    """Whether loads read the Hugging Face cache only (HF_HUB_OFFLINE, as huggingface_hub read it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_snapshot(repo_id: str, revision: str | None = None) -> str | None:
    """The local Hugging Face cache's snapshot folder of a hub id, or None (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        f = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    except Exception:  # noqa: BLE001 - no cache, odd id: nothing to check here
        return None
    return os.path.dirname(f) if isinstance(f, str) else None


def _local_slip(repo_id: str) -> str:
    """A hub-shaped id whose first part is a folder here is likely a mistyped local path."""
    first, rest = repo_id.split("/", 1)
    try:
        near = difflib.get_close_matches(rest, os.listdir(first), n=1)
    except OSError:  # no such folder (the usual case: a hub id), or one we may not list
        return ""
    return f"; {first}/ is a folder here" + (f": did you mean {first}/{near[0]}?" if near else "")


def check_hub_model(repo_id: str, key: str = "model.path", revision: str | None = None) -> None:
    """A hub id with no snapshot here, asked of the hub: one metadata request, no download. A typo, a
    model since removed from the hub (runwayml/stable-diffusion-v1-5, 2024), a missing revision or a
    repo that is no diffusers pipeline used to fail in every actor's load, after the index build.
    Where the hub cannot be asked (HF_HUB_OFFLINE, a driver without network, a hub error) the load
    checks it, as before; a cluster's nodes may reach the hub where the driver cannot."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    slip = _local_slip(repo_id)
    info = None
    try:
        if not constants.HF_HUB_OFFLINE:
            info = HfApi().model_info(repo_id, revision=revision, timeout=10)
    except GatedRepoError:  # a RepositoryNotFoundError: the repo exists; the load names the access
        return
    except RevisionNotFoundError as e:
        raise ModelError(f"model.revision={revision}: the hub model {repo_id} ({key}) has no such branch, tag or "
                         "commit") from e
    except RepositoryNotFoundError as e:
        raise ModelError(f"{key}={repo_id}: no such folder here, and the hub has no model {repo_id} (a private one "
                         f"needs HF_TOKEN){slip}") from e
    except Exception:  # noqa: BLE001 - unreachable, rate-limited, a proxy's page: the load decides
        pass
    if info is None:  # the hub was not asked or did not answer: only a mistyped local path is plain
        if slip:
            raise ModelError(f"{key}={repo_id}: no such folder{slip} (nor a hub id with a snapshot here)")
        return
    if getattr(info, "gated", False) and get_token() is None:
        raise ModelError(f"{key}={repo_id} is gated on the hub: accept its license on its page and set HF_TOKEN "
                         "(or `hf auth login`) on the driver and the cluster")
    names = [s.rfilename for s in info.siblings or []]
    # a VQ-decoded pipeline (LDM: vqvae/, Kandinsky: movq/) is told by its folders, before any download: refused
    # here, not only once every worker has downloaded and loaded it (load_model's own check)
    decoder = next((k for k in VQ_DECODERS if any(n.startswith(k + "/") for n in names)), None)
    if decoder is not None and "model_index.json" in names:
        raise vq_decoder_refusal(f"{key}={repo_id}", decoder)
    if info.siblings is not None and "model_index.json" not in names:
        single = [n for n in names if "/" not in n and n.endswith((".safetensors", ".ckpt"))]
        # a LoRA by its name, as weights_file_kind tells a file it cannot open (diffusers' LoRA scripts push
        # pytorch_lora_weights.safetensors): it was called a single-file checkpoint, to convert
        lora = next((n for n in single if n.endswith(".safetensors") and "lora" in n.lower()), None)
        if lora is not None:
            raise ModelError(f"{key}={repo_id}: the hub model has no model_index.json, so it is not a diffusers "
                             f"pipeline; its {lora} is a LoRA: set model.lora={repo_id} and {key} to its base "
                             "model, the one it was trained on (memex fuses the LoRA into it)")
        raise ModelError(f"{key}={repo_id}: the hub model has no model_index.json, so it is not a diffusers "
                         "pipeline" + (f"; its {single[0]} is a single-file checkpoint: download it and "
                                       f"{_convert_hint(single[0], key)}" if single else
                                       f" (it holds {', '.join(names[:5]) or 'no files'})"))


def _pipeline_index(path: str, revision: str | None = None) -> tuple[str | None, dict]:
    """(folder, its model_index.json): a local folder's, checked (check_local_checkpoint), or a hub
    id's cached snapshot's; (None, {}) for a hub id not cached here (asked of the hub:
    check_hub_model), {} for an unreadable cached index."""
    if os.path.exists(path) or not HUB_ID.match(path):
        return path, check_local_checkpoint(path)
    folder = cached_snapshot(path, revision)
    if folder is None:
        check_hub_model(path, "model.path", revision)
        return None, {}
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            return folder, json.load(f)
    except (OSError, json.JSONDecodeError):
        return folder, {}


def scheduler_config(path: str, revision: str | None = None) -> dict | None:
    """The pipeline's scheduler/scheduler_config.json, or None where this machine cannot read it (a hub id
    not cached here, a folder without one, a damaged file: the load names what is missing)."""
    folder, _ = _pipeline_index(path, revision)
    try:
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            base = json.load(f)
    except (TypeError, OSError, ValueError):
        return None
    return base if isinstance(base, dict) else None


def scheduler_timesteps(path: str, revision: str | None = None) -> int:
    """The training timesteps of the pipeline's scheduler (scheduler_config.json's num_train_timesteps): 1000
    for Stable Diffusion, fewer for a `memex train arch.num_train_timesteps` model; 1000, diffusers' default,
    where the folder does not say (a hub id not cached here)."""
    try:
        return int((scheduler_config(path, revision) or {}).get("num_train_timesteps", 1000))
    except (TypeError, ValueError):
        return 1000


def check_text_encoder_folder(path: str, index: dict) -> str:
    """Validate a fine-tuned text encoder folder (model.text_encoder) against the base's own
    (model_index.json's text_encoder entry, when known); return its transformers class name."""
    key = f"model.text_encoder={path}"
    if os.path.isfile(path):
        raise ModelError(_file_instead_of_folder(path, "model.text_encoder"))
    if not os.path.isdir(path):
        raise ModelError(f"{key}: no such folder (a text encoder folder saved with save_pretrained, e.g. a "
                         "trainer's checkpoint-<step>/text_encoder)")
    cfg_file = os.path.join(path, "config.json")
    try:
        with open(cfg_file) as f:
            cls = (json.load(f).get("architectures") or [None])[0]
    except FileNotFoundError:
        raise ModelError(f"{key} has no config.json: give a text encoder folder saved with save_pretrained") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file} is not valid JSON: {e}") from e
    spec = index.get("text_encoder")
    if index and not (isinstance(spec, list) and len(spec) == 2 and spec[0]):
        raise ModelError(f"{key}, but the base model.path has no text encoder (an unconditional model): drop "
                         "model.text_encoder")
    if spec and spec[1] and cls != spec[1]:
        raise ModelError(f"{key} holds a {cls}, but the base's text encoder is a {spec[1]} (its tokenizer is made "
                         "for that one): give the text encoder fine-tuned from this base")
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in os.listdir(path)):
        raise ModelError(f"{key} has no weights (*.safetensors or *.bin)")
    return cls


def _base_components(path: str, revision: str | None, unet: str | None,
                     text_encoder: str | None) -> tuple[str | None, dict, list]:
    """(folder, model_index.json, [(component folder, library, class)]) of the pipeline a load reads: the
    overrides replace the base's UNet and text encoder, and UNUSED_COMPONENTS are never loaded."""
    skip = ({"unet"} if unet is not None else set()) | ({"text_encoder"} if text_encoder is not None else set()) \
        | set(UNUSED_COMPONENTS)
    folder, index = _pipeline_index(path, revision)
    return folder, index, (_components(folder, index, skip) if folder else [])


def _base_has_variant(path: str, variant: str, unet: str | None, text_encoder: str | None,
                      revision: str | None = None) -> bool:
    """Whether a component of the pipeline folder the load reads (the overrides' left out; a hub id's cached
    snapshot) holds `variant`."""
    return any(has_variant(sub, variant) for sub, _, _ in _base_components(path, revision, unet, text_encoder)[2])


def check_model_inputs(path: str, unet: str | None = None, allow_pickle: bool = False,
                       revision: str | None = None, variant: str | None = None,
                       lora: str | None = None, text_encoder: str | None = None) -> ModelKind | None:
    """The early check of generate and audit, before any cluster work: the pipeline folder (its
    layout, every component's weights), the UNet and text encoder overrides if any; no weights are read. Returns the
    family the folder declares (`declared_kind`), None where it cannot tell.

    A hub id is checked on its cached snapshot, the components the cache holds; with no snapshot
    the check is deferred to the load (this machine may have no network), which refuses
    pickle-only weights itself (use_safetensors=True)."""
    library_logs_to_file()  # before diffusers/transformers are imported: their warnings go to the log file
    folder, index, components = _base_components(path, revision, unet, text_encoder)
    overrides = [o for o in (unet, text_encoder) if o is not None and os.path.isdir(o)]  # they may hold it alone
    # `folder`: the local folder, or a hub id's cached snapshot where the load reads only the cache (HF_HUB_OFFLINE):
    # online, a snapshot cached without the variant's files is completed by the load from the hub, which decides;
    # a hub id not cached here is left to the load
    judged = folder and (folder == path or _hub_offline())
    if variant and judged and not any(has_variant(sub, variant) for sub, _, _ in components) \
            and not any(has_variant(o, variant) for o in overrides):
        cached = "" if folder == path else (
            f" (its snapshot cached at {folder}; to read the hub's {variant} files, download them into the cache "
            f"once: DiffusionPipeline.download('{path}', variant='{variant}'))")
        raise ModelError(f"model.variant={variant} but no component of model.path={path} has {variant} weights "
                         f"(files like diffusion_pytorch_model.{variant}.safetensors){cached}: leave model.variant "
                         "unset, or give the variant a component folder holds")
    for sub, library, cls in components:
        check_component_weights(sub, library, cls, f"model.path={path}", allow_pickle, variant)
    unet_cls = None
    if unet is not None:
        unet_cls = check_unet_folder(unet)
        check_component_weights(unet, "diffusers", unet_cls, f"model.unet={unet}", allow_pickle, variant)
        check_sampled_unet(_unet_config(unet), f"model.unet={unet}: the UNet")
    else:
        if folder:
            check_sampled_pipeline(path, folder, index)
        if isinstance(index.get("unet"), list) and len(index["unet"]) == 2:
            unet_cls = index["unet"][1]
    if text_encoder is not None:
        te_cls = check_text_encoder_folder(text_encoder, index)
        check_component_weights(text_encoder, "transformers", te_cls, f"model.text_encoder={text_encoder}",
                                allow_pickle, variant)
    declared = declared_kind(index, unet_cls)
    if lora:
        if declared == ModelKind.unconditional:
            raise ModelError(f"model.lora={lora} on model.path={path}, an unconditional model: its pipeline "
                             "(DDPMPipeline) loads no LoRA; a fine-tuned UNet goes in model.unet")
        from memex.lora import check_lora

        def shapes_of(component: str) -> dict | None:
            if component == "unet" and unet is not None:
                return model_shapes(unet, "diffusers", unet_cls)
            if component == "text_encoder" and text_encoder is not None:  # the override is what loads
                return model_shapes(text_encoder, "transformers", te_cls)
            spec = index.get(component)
            if not folder or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
                return None
            return model_shapes(os.path.join(folder, component), spec[0], spec[1])

        check_lora(lora, shapes_of)
    return declared


def generated_channels(path: str, unet: str | None = None, revision: str | None = None) -> int | None:
    """Channels of the images the model at `path` generates, from its config files (as
    sampling.image_channels finds them on the loaded model): the VAE decoder's out_channels, else
    the UNet's in_channels. None when they cannot be read here (a hub id not cached, a damaged config)."""
    found = _readable_index(path, revision)
    if found is None:
        return None
    folder, index = found
    if isinstance(index.get("vae"), list) and index["vae"][0]:
        return _unet_config(os.path.join(folder, "vae")).get("out_channels")
    return _unet_config(unet or os.path.join(folder, "unet")).get("in_channels")


def _readable_index(path: str, revision: str | None) -> tuple[str, dict] | None:
    """(folder, model_index.json) when this machine can read the model's configs, else None (a hub id
    not cached here, a folder the checks refuse: they name it elsewhere)."""
    try:
        folder, index = _pipeline_index(path, revision)
    except ModelError:
        return None
    return (folder, index) if folder else None


def native_size(path: str, unet: str | None = None, revision: str | None = None) -> tuple[int, int] | None:
    """(height, width) of the images the model at `path` makes by default, from its configs: the UNet's
    sample_size (an int, or [height, width]) times the VAE's downscaling (2^(levels - 1)), as the
    Sampler computes it. None when they cannot be read here."""
    found = _readable_index(path, revision)
    if found is None:
        return None
    folder, index = found
    native = _unet_config(unet or os.path.join(folder, "unet")).get("sample_size")
    if native is None:
        return None
    h, w = (native, native) if isinstance(native, int) else native
    scale = 1
    if isinstance(index.get("vae"), list) and index["vae"][0]:
        scale = 2 ** (len(_unet_config(os.path.join(folder, "vae")).get("block_out_channels") or [0]) - 1)
    return h * scale, w * scale


def check_unet_fits(path: str, unet: str | None, text_encoder: str | None, revision: str | None,
                    height: int | None, width: int | None) -> None:
    """The UNet against what it is loaded and sampled with, from config.json files before any cluster
    work (each failed in every sampler, after the index build):
      - the text encoder's width against the UNet's cross_attention_dim (encoder_hid_dim when the UNet
        projects the states itself, as IF does): an SD 2.x fine-tuned UNet (1024) on an SD 1.5 base
        (CLIP ViT-L: 768) failed with "mat1 and mat2 shapes cannot be multiplied";
      - the VAE's latent_channels against the UNet's in_channels;
      - a UNet saved without sample_size needs sampling.height and sampling.width;
      - an unconditional UNet2DModel needs sides that divide by 2^(levels - 1) (the Sampler says why).
    A hub id not cached here is checked by the Sampler once loaded."""
    folder, index = _pipeline_index(path, revision)
    if not folder:
        return
    u = _unet_config(unet or os.path.join(folder, "unet"))
    te = _unet_config(text_encoder or os.path.join(folder, "text_encoder")) if index.get("text_encoder", [None])[0] \
        or text_encoder else {}
    unet_key = f"model.unet={unet}" if unet else f"model.path={path}"
    te_key = f"model.text_encoder={text_encoder}" if text_encoder else f"model.path={path}"
    states = te.get("hidden_size") or te.get("d_model")  # CLIPTextModel | T5EncoderModel (IF)
    want = u.get("encoder_hid_dim") or u.get("cross_attention_dim")
    dims = set(want) if isinstance(want, list) else {want} if want else set()
    if states and dims and states not in dims:
        raise ModelError(f"{unet_key}: the UNet takes text states of width {want} (cross_attention_dim), and the "
                         f"text encoder of {te_key} gives {states}: the UNet was trained with another text "
                         "encoder (SD 2.x: 1024, SD 1.x: 768); give the base it was fine-tuned from as model.path")
    has_vae = isinstance(index.get("vae"), list) and bool(index["vae"][0])
    vae = _unet_config(os.path.join(folder, "vae")) if has_vae else {}
    if vae.get("latent_channels") and u.get("in_channels") and vae["latent_channels"] != u["in_channels"]:
        raise ModelError(f"{unet_key}: the UNet takes {u['in_channels']} input channels, and the VAE of "
                         f"model.path={path} makes latents of {vae['latent_channels']}: give the base it was "
                         "fine-tuned from as model.path")
    # the images' channels (sampling.image_channels, from the loaded model in every sampler, after the index build)
    # a pipeline with a VAE: its decoder's, when its config is here (a hub cache made with vae= passed in has
    # none: the UNet's 4 latent channels are no image's); without one, the UNet's input (as generated_channels
    # finds them, here from the configs read above)
    where, n = ("VAE", vae.get("out_channels")) if has_vae else ("UNet", u.get("in_channels"))
    if isinstance(n, int) and n not in (1, 3):
        raise ModelError(f"{unet_key}: its {where} makes {n}-channel images; memex samples only 1-channel (grayscale) "
                         "or 3-channel (RGB) models, the images a PNG holds and the training-set comparisons take")
    if "sample_size" in u and u["sample_size"] is None and not (height and width):
        raise ModelError(f"{unet_key}: the UNet's config has no sample_size, so memex cannot tell its image size: "
                         "set sampling.height and sampling.width (SD 1.x: 512)")
    levels = len(u.get("block_out_channels") or [])
    native = u.get("sample_size")
    if u.get("_class_name") == "UNet2DModel" and levels > 1:
        h = height or (native if isinstance(native, int) else (native or [0, 0])[0])
        w = width or (native if isinstance(native, int) else (native or [0, 0])[1])
        unit = 2 ** (levels - 1)
        if h % unit or w % unit:
            raise ModelError(f"{unet_key}: image size {h}x{w}, and this UNet has {levels} levels (it halves the "
                             f"image {levels - 1} times), so sampling.height and sampling.width must be multiples "
                             f"of {unit}")


VQ_DECODERS = ("vqvae", "movq")


def vq_decoder_refusal(pipeline: str, decoder: str) -> ModelError:
    """The refusal of a pipeline (`pipeline`: "model.path=... (LDMPipeline)") whose latents a VQ `decoder` decodes:
    its UNet denoises latents that this decoder, not a `vae`, turns into pixels; sampled, memex saved the
    undecoded latents as the images (8x8 for 16x16), and the audit found nothing, without a word."""
    return ModelError(f"{pipeline} decodes its latents with a {decoder} (a VQ autoencoder), which memex does not "
                      f"run; {SAMPLED}")


def check_sampled_pipeline(path: str, folder: str, index: dict, key: str = "model.path") -> None:
    """The pipeline at `folder` (`key`=`path`) denoises with a UNet memex samples, from its configs."""
    pipeline = f"{key}={path} ({index.get('_class_name', 'a pipeline')})"
    decoder = next((k for k in VQ_DECODERS if isinstance(index.get(k), list) and index[k][0]), None)
    if decoder is not None:  # LDMPipeline (CelebA-HQ LDM), LDMTextToImagePipeline, Kandinsky's MoVQ
        raise vq_decoder_refusal(pipeline, decoder)
    if isinstance(index.get("unet"), list) and len(index["unet"]) == 2:
        check_sampled_unet(_unet_config(os.path.join(folder, "unet")), f"{pipeline}: its UNet")
    elif index:  # SD3, Flux, PixArt, DiT: a transformer denoises
        parts = ", ".join(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0])
        raise ModelError(f"{pipeline} has no unet component (it holds {parts}); {SAMPLED}")


def declared_kind(index: dict, unet_cls: str | None) -> ModelKind | None:
    """The family model_index.json and the UNet's class declare, as `_detect_kind` finds it on the
    loaded pipeline; None where they do not say (a hub id not cached here, another UNet class)."""
    if unet_cls == "UNet2DModel":
        return ModelKind.unconditional
    if unet_cls == "UNet2DConditionModel":
        return ModelKind.latent_text if index.get("vae", [None])[0] is not None else ModelKind.pixel_text
    return None


SAMPLED = ("memex samples UNet pipelines that take only the noise (and a prompt): SD 1.x/2.x "
           "(StableDiffusionPipeline), IF-style pixel-space text models (IFPipeline) and unconditional DDPM "
           "UNets (DDPMPipeline)")


def check_sampled_unet(config: dict, subject: str) -> None:
    """A UNet memex's sampler cannot drive, refused from its config.json before any cluster work:
    each failed in the sampler actors after the index build, SDXL with "TypeError: argument of
    type 'NoneType' is not iterable", an inpainting UNet with a convolution's shape error.
    `subject` names it: "model.path=... (StableDiffusionXLPipeline): its UNet"."""
    extra = config.get("addition_embed_type")
    if extra not in (None, "text"):  # "text" (IF): the UNet embeds its encoder_hidden_states itself
        what = ("SDXL's pooled text and image-size embeddings from a second text encoder" if extra == "text_time"
                else "embeddings the pipeline computes besides the prompt's")
        raise ModelError(f"{subject} needs added conditioning (addition_embed_type={extra!r}: {what}), which "
                         f"memex does not compute; {SAMPLED}")
    cin, cout = config.get("in_channels"), config.get("out_channels")
    if isinstance(cin, int) and isinstance(cout, int) and cin > cout:  # learned variance has more out: fine
        raise ModelError(f"{subject} takes {cin} input channels for {cout} output channels: an inpainting, "
                         f"upscaling or image-editing model, which needs an image besides the noise; {SAMPLED}")
    for key in ("class_embed_type", "num_class_embeds"):
        if config.get(key) is not None:
            raise ModelError(f"{subject} is class-conditional ({key}={config[key]!r}) and memex passes no class "
                             f"labels; {SAMPLED}")
    if config.get("time_embedding_type") == "fourier":  # Score-SDE VE: NCSN++ (google/ncsnpp-*)
        # it takes the noise level sigma (0.01 to ~1348 with ScoreSdeVeScheduler, no betas), not a DDPM timestep:
        # every solver memex builds from that config ran diffusers' default linear betas, NaN images blamed on
        # the weights (ddpm, ddim, euler) or noise saved without a word (dpm_multistep)
        raise ModelError(f"{subject} is a score-SDE variance-exploding model (time_embedding_type='fourier': "
                         "NCSN++), conditioned on noise levels, not DDPM timesteps: memex samples DDPM-family "
                         f"(variance-preserving) models only; {SAMPLED}")
    if config.get("time_cond_proj_dim") is not None:  # LCM / TCD distillation: the guidance scale is an input
        # (a timestep_cond embedding); without it the UNet ran off what it learned, with CFG stacked on top
        raise ModelError(f"{subject} is guidance-distilled (time_cond_proj_dim={config['time_cond_proj_dim']}: LCM, "
                         f"TCD), and takes the guidance scale as an embedding memex does not pass: audit the model it "
                         f"was distilled from ({SAMPLED})")


def _unet_config(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}  # a missing or broken config.json: check_local_checkpoint and the weight checks name it


def check_kind(path: str, requested: ModelKind, declared: ModelKind | None, takes_prompts: bool,
               source: str = "model_index.json") -> None:
    """model.kind against the family the folder declares (`source`: model_index.json before any
    cluster work; the loaded pipeline's class in load_model), and prompts against an unconditional
    model (`takes_prompts`: the prompt source is not prompts=none). Before any cluster work it
    refuses what the workers found after the index build and a claimed run folder."""
    if requested != ModelKind.auto and declared is not None and requested != declared:
        fix = f"model.kind={declared.value} (or auto)" + (" with prompts=none" if declared == ModelKind.unconditional
                                                          else "")
        article = "an" if declared.value[0] in "aeiou" else "a"
        from memex.config import demo_models

        # a kind nobody set is a shipped demo option's (model=demo, the default): model.kind=... alone kept the
        # demo's name and tuning on the other model (80 samples x 10 steps, guidance 3)
        demo = next((o for o, d in demo_models().items() if d["kind"] == requested.value
                     and not os.path.abspath(path).startswith(os.path.dirname(os.path.abspath(d["path"])) + os.sep)),
                    None)
        option = (f" (the kind of model={demo}, a shipped demo's option, unless you set it; model=demo is the "
                  "default: for a model other than the shipped demo give model=local, or its own option such as "
                  "model=sd15, which drops the demo's name and tuning too)") if demo else ""
        raise ModelError(f"model.kind={requested.value}{option} but {path} holds {article} {declared.value} model "
                         f"({source}): set {fix}")
    if (declared or requested) == ModelKind.unconditional and takes_prompts:
        raise ConfigError(f"model.path={path} holds an unconditional model, which takes no prompts: set prompts=none")


def _detect_kind(pipe: Any) -> ModelKind:
    from diffusers import UNet2DConditionModel, UNet2DModel

    unet = getattr(pipe, "unet", None)
    if isinstance(unet, UNet2DModel):
        return ModelKind.unconditional
    if isinstance(unet, UNet2DConditionModel):
        return ModelKind.latent_text if getattr(pipe, "vae", None) is not None else ModelKind.pixel_text
    raise ModelError(f"{type(pipe).__name__} has no UNet2DModel/UNet2DConditionModel 'unet' component")


# The schedulers memex samples with, each checked against diffusers' own pipeline in
# tests/test_schedulers.py. Left out on purpose: schedulers whose noise is not drawn row by row
# from the per-sample generators (DPMSolverSDE, CosineDPMSolverMultistep: one Brownian tree seeded
# for the whole batch), so a sample would depend on its batch; and ones that need more than the
# standard loop (LCM and TCD: a guidance-embedding UNet; EDM*: other preconditioning).
SCHEDULERS = {
    SchedulerKind.ddim: "DDIMScheduler",  # SD 2.x
    SchedulerKind.ddpm: "DDPMScheduler",  # unconditional models, DeepFloyd IF
    SchedulerKind.pndm: "PNDMScheduler",  # SD 1.x
    SchedulerKind.euler: "EulerDiscreteScheduler",  # SDXL
    SchedulerKind.euler_ancestral: "EulerAncestralDiscreteScheduler",
    SchedulerKind.dpm_multistep: "DPMSolverMultistepScheduler",
    SchedulerKind.dpm_singlestep: "DPMSolverSinglestepScheduler",
    SchedulerKind.lms: "LMSDiscreteScheduler",  # needs scipy (integrates its coefficients)
    SchedulerKind.heun: "HeunDiscreteScheduler",  # 2nd order: two UNet calls per step
    SchedulerKind.kdpm2: "KDPM2DiscreteScheduler",  # 2nd order
    SchedulerKind.kdpm2_ancestral: "KDPM2AncestralDiscreteScheduler",  # 2nd order, step noise
    SchedulerKind.unipc: "UniPCMultistepScheduler",
    SchedulerKind.deis: "DEISMultistepScheduler",
}
KIND_OF_CLASS = {name: kind for kind, name in SCHEDULERS.items()}


# A scheduler config's noise schedule: betas (DDPM-family, variance-preserving: every class in SCHEDULERS, LCM,
# TCD), or noise levels sigma with no betas (ScoreSdeVeScheduler, CMStochasticIterativeScheduler, EDM*)
BETA_KEYS = ("beta_start", "beta_schedule", "trained_betas")
SIGMA_KEYS = ("sigma_min", "sigma_max", "sigma_data")


def scheduler_kind(base_config: Any, kind: SchedulerKind, model_path: str) -> SchedulerKind:
    """`kind`, or for `default` the kind of the checkpoint's scheduler class; unknown classes are refused,
    and so is a schedule of noise levels without betas (VE, EDM, consistency), whatever `kind`."""
    name = base_config.get("_class_name")
    betas = any(k in base_config for k in BETA_KEYS)
    if name not in KIND_OF_CLASS and not betas and any(k in base_config for k in SIGMA_KEYS):
        # a solver built from this config gets diffusers' default linear betas, not the model's schedule: NaN
        # images blamed on the weights (ddpm, ddim, euler) or noise saved without a word (dpm_multistep)
        raise ModelError(f"model.path={model_path}: its scheduler config names {name!r}, a variance-exploding, EDM or "
                         "consistency schedule (noise levels sigma_min..sigma_max, no betas), which memex cannot "
                         "sample, with any sampling.scheduler (each would run default betas, not the model's); memex "
                         "samples DDPM-family (variance-preserving) models only: audit one of those")
    if kind != SchedulerKind.default:
        return kind
    if name not in KIND_OF_CLASS:
        choices = ", ".join(k.value for k in SCHEDULERS)
        kept = ("the model's noise schedule is kept, only the solver changes" if betas else
                "its config names no betas, so the solver runs diffusers' default ones: check they are the model's")
        raise ModelError(f"model.path={model_path}: its scheduler config names {name!r}, which memex does not "
                         f"sample with (sampling.scheduler=default); set sampling.scheduler=<kind>, one of {choices} "
                         f"({kept})")
    return KIND_OF_CLASS[name]


# diffusers' solvers that step an x0-predicting (prediction_type "sample") model; PNDM refuses it, Euler
# ancestral and KDPM2 (ancestral) raise NotImplementedError, each from the first step of every sampler
SAMPLE_PREDICTION = (SchedulerKind.ddim, SchedulerKind.ddpm, SchedulerKind.euler, SchedulerKind.heun,
                     SchedulerKind.lms, SchedulerKind.dpm_multistep, SchedulerKind.dpm_singlestep,
                     SchedulerKind.unipc, SchedulerKind.deis)
PNDM_PRK_MIN_STEPS = 4  # PNDM's Runge-Kutta warm-up (skip_prk_steps false: a DDPM config) needs 4 steps


def check_solver(base_config: Any, kind: SchedulerKind, steps: int, model_path: str = "?") -> SchedulerKind:
    """The solver `kind` (default: the checkpoint's) against the checkpoint's scheduler config and the step
    count, before any sampling: each of these failed in every sampler, with diffusers' words (an x0 model on
    PNDM: "prediction_type given as sample must be one of epsilon or v_prediction"; PNDM at 2 steps on a
    DDPM config: "operands could not be broadcast together"). Returns the kind."""
    kind = scheduler_kind(base_config, kind, model_path)
    if base_config.get("prediction_type") == "sample" and kind not in SAMPLE_PREDICTION:
        raise ModelError(f"model.path={model_path} predicts x0 (its scheduler's prediction_type is sample), which "
                         f"the {kind.value} solver cannot step: set sampling.scheduler to one of "
                         f"{', '.join(k.value for k in SAMPLE_PREDICTION)}")
    if kind == SchedulerKind.pndm and not base_config.get("skip_prk_steps", False) and steps < PNDM_PRK_MIN_STEPS:
        raise ConfigError(f"sampling.num_inference_steps={steps}: PNDM on this checkpoint's scheduler config "
                          f"(skip_prk_steps false, model.path={model_path}) needs at least {PNDM_PRK_MIN_STEPS} "
                          "steps for its Runge-Kutta warm-up; set more steps, or another sampling.scheduler "
                          "(ddim, ddpm)")
    return kind


def check_scheduler(path: str, revision: str | None, kind: SchedulerKind, steps: int) -> None:
    """check_solver from the folder's scheduler config before any cluster work (a hub id not cached here:
    checked by the Sampler once loaded)."""
    if (base := scheduler_config(path, revision)) is not None:
        check_solver(base, kind, steps, path)


def make_scheduler(base_config: Any, kind: SchedulerKind, model_path: str = "?") -> Any:
    """A fresh scheduler of `kind` built from the checkpoint's scheduler config (its betas, prediction type)."""
    import diffusers

    kind = scheduler_kind(base_config, kind, model_path)
    try:  # a missing backend (scipy for LMS) gives a placeholder class that raises ImportError when used
        return getattr(diffusers, SCHEDULERS[kind]).from_config(base_config)
    except ImportError as e:
        raise ModelError(f"sampling.scheduler={kind.value} ({SCHEDULERS[kind]}, model.path={model_path}) needs a "
                         f"package that is not installed: {' '.join(str(e).split())}") from e


# Components a pipeline folder may list that memex never runs: it samples with the UNet, scheduler,
# VAE and text encoder only (memex/sampling.py), and must see the raw generations (a safety checker
# blacks out the very pictures an audit looks for). SD 1.x ships a CLIP ViT-L/14 safety checker:
# 304M parameters, 1.2 GB in float32, loaded onto every sampler actor's GPU and, from the hub,
# downloaded by every node. Passed as None to from_pretrained, diffusers neither downloads nor loads them.
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "watermarker", "image_encoder")


def _unused_components(path: str, revision: str | None) -> dict[str, Any]:
    """from_pretrained overrides that skip the UNUSED_COMPONENTS the folder's model_index.json lists
    (a hub id's cached one). A hub id not downloaded yet gets all of them: its model_index.json is not
    known without a request (which, offline, huggingface_hub retries for ~23 s before the load fails
    anyway), and diffusers ignores, and logs, an override its pipeline does not take."""
    folder, index = _pipeline_index(path, revision)
    if folder is None:
        return {**dict.fromkeys(UNUSED_COMPONENTS), "requires_safety_checker": False}
    out: dict[str, Any] = {name: None for name in UNUSED_COMPONENTS
                           if isinstance(index.get(name), list) and index[name][:1] != [None]}
    if "safety_checker" in out and "requires_safety_checker" in index:
        out["requires_safety_checker"] = False  # else diffusers warns that the checker is off
    return out


def load_model(path: str, kind: ModelKind = ModelKind.auto, dtype: str = "float32",
               device: str = "cpu", revision: str | None = None, unet: str | None = None,
               allow_pickle: bool = False, variant: str | None = None, lora: str | None = None,
               text_encoder: str | None = None) -> LoadedModel:
    """Load with `DiffusionPipeline.from_pretrained` from a local folder or a hub id.

    `variant` (model.variant): diffusers' weight variant ("fp16"), read where a component has it;
    the `unet` override reads it too when its folder holds it. `lora` (model.lora): a LoRA
    fine-tune loaded onto the pipeline and fused into its weights (memex/lora.py).

    `unet`: a fine-tuned UNet folder loaded with its own class's `from_pretrained` and passed to
    the pipeline in place of the base's (diffusers' component override), the way the diffusers
    fine-tuning scripts' checkpoint-<step>/unet folders are meant to be used. `text_encoder`: the
    same for a fine-tuned text encoder (DreamBooth's checkpoint-<step>/text_encoder).

    `allow_pickle` (model.allow_pickle): without it only safetensors are read (use_safetensors=True);
    with it, a component with only .bin weights is read by diffusers' load_state_dict and
    transformers' load_state_dict, both torch.load(weights_only=True) (tests/test_preflight.py
    pins that), after `check_model_inputs` has already unpickled each one that way on `meta`.
    """
    import importlib

    library_logs_to_file()  # before the import below: a text pipeline's import warns on transformers 5
    import diffusers
    import torch
    from diffusers import DiffusionPipeline

    local = os.path.isdir(path) or not HUB_ID.match(path)
    check_model_inputs(path, unet, allow_pickle, revision, variant, lora, text_encoder)
    # None: safetensors where there are any, else .bin (diffusers and transformers, per component)
    # diffusers >= 0.36 takes `dtype` and warns that `torch_dtype` is deprecated; older ones know only `torch_dtype`
    dtype_kw = "dtype" if hasattr(importlib.import_module("diffusers.utils.deprecation_utils"), "_resolve_dtype") \
        else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_kw: getattr(torch, dtype), "use_safetensors": None if allow_pickle else True}
    # a plain base with only an override saved as the variant: diffusers refuses a variant no component has.
    # Offline, a hub id is judged by its cached snapshot, all the load reads (it was asked for the variant
    # always, and failed in every actor); online, or not cached here, it is asked for it, the hub deciding
    if variant and ((not local and (not _hub_offline() or cached_snapshot(path, revision) is None))
                    or _base_has_variant(path, variant, unet, text_encoder, revision)):
        kwargs["variant"] = variant
    if not local and revision:
        kwargs["revision"] = revision
    kwargs.update(_unused_components(path, revision))
    if unet is not None:
        cls = check_unet_folder(unet)
        try:
            own = {"variant": variant} if variant and has_variant(unet, variant) else {}
            kwargs["unet"] = getattr(diffusers, cls).from_pretrained(unet, **{dtype_kw: kwargs[dtype_kw]}, **own,
                                                                     use_safetensors=kwargs["use_safetensors"])
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise ModelError(f"could not load model.unet={unet}: {type(e).__name__}: {e}") from e
    if text_encoder is not None:  # the same override, for a fine-tuned text encoder (DreamBooth)
        import transformers

        with open(os.path.join(text_encoder, "config.json")) as f:
            te_cls = json.load(f)["architectures"][0]
        try:
            own = {"variant": variant} if variant and has_variant(text_encoder, variant) else {}
            kwargs["text_encoder"] = getattr(transformers, te_cls).from_pretrained(
                text_encoder, dtype=kwargs[dtype_kw], use_safetensors=kwargs["use_safetensors"], **own)
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise ModelError(f"could not load model.text_encoder={text_encoder}: {type(e).__name__}: {e}") from e
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and the likely fix
        where = "local folder" if local else "hub id (needs network access and, if gated, HF_TOKEN)"
        hint = "" if allow_pickle or "safetensors" not in str(e) else f" (if it has only .bin weights: {PICKLE_FIX})"
        raise ModelError(f"could not load model.path={path} as a {where}: {type(e).__name__}: {e}{hint}") from e
    # check_sampled_pipeline reads model_index.json, which a hub id not cached before this load (the driver's
    # check, and this one's above) does not have: its UNet2DModel passed as `unconditional`
    decoder = next((k for k in VQ_DECODERS if pipe.components.get(k) is not None), None)
    if decoder is not None:
        raise vq_decoder_refusal(f"model.path={path} ({type(pipe).__name__})", decoder)
    found = _detect_kind(pipe)
    check_kind(path, kind, found, False, type(pipe).__name__)
    check_sampled_unet(dict(pipe.unet.config), f"model.path={path} ({type(pipe).__name__}): its UNet")
    missing = [c for c in NEEDED[found] if getattr(pipe, c, None) is None]
    if missing:
        raise ModelError(f"{path} is a {found.value} model but lacks components {missing}")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    model_id = path if unet is None else f"{path}+unet={unet}"
    if text_encoder is not None:
        model_id += f"+text_encoder={text_encoder}"
    if lora:  # on the device: the fuse is a matmul per adapted layer
        from memex.lora import apply_lora

        apply_lora(pipe, lora, path)
        model_id += f"+lora={lora}"
    return LoadedModel(pipe=pipe, kind=found, model_id=model_id, path=path)


def conditioning_keys(path: str, revision: str | None = None):
    """A function texts -> keys, equal exactly where the model's text encoder reads the same tokens, from the
    pipeline's own tokenizer as encode_text calls it (truncated at model_max_length: 77 for CLIP). CLIP
    lowercases and collapses whitespace, so "A red car" and "a red  car" are one conditioning, and so is any
    text past its 75th token; sampling them as two prompts spent two prompts' budget on one. None for a
    pipeline without a tokenizer (unconditional). Cost: ~45 us a caption (100,000 in 4.6 s on 2 cores)."""
    folder, index = _pipeline_index(path, revision)
    if folder is not None and not (index.get("tokenizer") or [None, None])[1]:
        return None  # a local or cached pipeline that takes no text
    library_logs_to_file()
    from transformers import AutoTokenizer

    try:  # the pipeline's own loading: a folder, or the hub (cached, or asked like the load asks it)
        tok = AutoTokenizer.from_pretrained(folder or path, subfolder="tokenizer",
                                            **({"revision": revision} if folder is None and revision else {}))
    except Exception as e:  # noqa: BLE001 - re-raised naming the key, or (a hub id) left to the actors
        if folder is None:  # not cached, and the hub out of the driver's reach: the load is the actors' (as
            # check_hub_model defers), and the prompts are merged by their text alone
            import logging

            logging.getLogger("memex.models").warning(
                "model.path=%s: its tokenizer is neither cached here nor reachable (%s: %s); prompts it reads as "
                "the same tokens are sampled as separate prompts", path, type(e).__name__, e)
            return None
        raise ModelError(f"could not load the tokenizer of model.path={path} (its tokenizer/ folder), which the "
                         f"prompts are read with: {type(e).__name__}: {e}") from e

    def keys(texts: list[str]) -> list[tuple[int, ...]]:
        return [tuple(ids) for ids in tok(list(texts), truncation=True, max_length=tok.model_max_length).input_ids]

    return keys
