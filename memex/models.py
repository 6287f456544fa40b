"""Load a diffusion checkpoint with diffusers' own `DiffusionPipeline.from_pretrained`.

A local folder is checked first, so a missing or malformed checkpoint fails with a message that
names the missing piece instead of a deep diffusers traceback. Hub ids go straight to diffusers.
The model family decides how `memex.sampling` drives the components:

    unconditional  UNet2DModel                       (DDPMPipeline layout)
    latent_text    UNet2DConditionModel + VAE        (StableDiffusionPipeline layout)
    pixel_text     UNet2DConditionModel, no VAE      (IFPipeline layout)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from memex.config import MemexError, ModelKind, SchedulerKind

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


def resolve_device(requested: str) -> str:
    """resources.device: "auto" -> cuda when a GPU is visible to this process, else cpu."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested


def check_local_checkpoint(path: str) -> dict:
    """Validate a local diffusers folder without loading weights; return its model_index.json."""
    if not os.path.isdir(path):
        raise ModelError(
            f"model.path={path}: no such folder"
            + ("" if not HUB_ID.match(path) else " (and not found as a hub id either)")
        )
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ModelError(
            f"model.path={path} has no model_index.json: not a diffusers pipeline folder "
            "(save one with pipeline.save_pretrained(path))"
        )
    try:
        with open(index_file) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{index_file} is not valid JSON: {e}") from e
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = os.path.join(path, name)
        if not os.path.isdir(sub):
            raise ModelError(f"model.path={path}: model_index.json lists component {name!r} "
                             f"but folder {sub} is missing")
        files = os.listdir(sub)
        if name in ("unet", "vae", "text_encoder"):
            if not any(f.endswith(".json") for f in files):
                raise ModelError(f"component {name!r} in {sub} has no config.json")
            if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
                raise ModelError(f"component {name!r} in {sub} has no weights (*.safetensors)")
    return index


def check_unet_folder(path: str) -> str:
    """Validate a standalone UNet folder (model.unet); return its class name from config.json."""
    cfg_file = os.path.join(path, "config.json")
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


def check_model_inputs(path: str, unet: str | None = None) -> None:
    """The early check of generate and audit: a local pipeline folder and the UNet override, if any."""
    if os.path.isdir(path) or not HUB_ID.match(path):
        check_local_checkpoint(path)
    if unet is not None:
        check_unet_folder(unet)


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


def scheduler_kind(base_config: Any, kind: SchedulerKind, model_path: str) -> SchedulerKind:
    """`kind`, or for `default` the kind of the checkpoint's scheduler class; unknown classes are refused."""
    if kind != SchedulerKind.default:
        return kind
    name = base_config.get("_class_name")
    if name not in KIND_OF_CLASS:
        choices = ", ".join(k.value for k in SCHEDULERS)
        raise ModelError(f"model.path={model_path}: its scheduler config names {name!r}, which memex does not "
                         f"sample with (sampling.scheduler=default); set sampling.scheduler=<kind>, one of {choices} "
                         "(the model's noise schedule is kept, only the solver changes)")
    return KIND_OF_CLASS[name]


def make_scheduler(base_config: Any, kind: SchedulerKind, model_path: str = "?") -> Any:
    """A fresh scheduler of `kind` built from the checkpoint's scheduler config (its betas, prediction type)."""
    import diffusers

    kind = scheduler_kind(base_config, kind, model_path)
    try:  # a missing backend (scipy for LMS) gives a placeholder class that raises ImportError when used
        return getattr(diffusers, SCHEDULERS[kind]).from_config(base_config)
    except ImportError as e:
        raise ModelError(f"sampling.scheduler={kind.value} ({SCHEDULERS[kind]}, model.path={model_path}) needs a "
                         f"package that is not installed: {' '.join(str(e).split())}") from e


def load_model(path: str, kind: ModelKind = ModelKind.auto, dtype: str = "float32",
               device: str = "cpu", revision: str | None = None, unet: str | None = None) -> LoadedModel:
    """Load with `DiffusionPipeline.from_pretrained` from a local folder or a hub id.

    `unet`: a fine-tuned UNet folder loaded with its own class's `from_pretrained` and passed to
    the pipeline in place of the base's (diffusers' component override), the way the diffusers
    fine-tuning scripts' checkpoint-<step>/unet folders are meant to be used.
    """
    import diffusers
    import torch
    from diffusers import DiffusionPipeline

    local = os.path.isdir(path) or not HUB_ID.match(path)
    if local:
        check_local_checkpoint(path)
    kwargs: dict[str, Any] = {"torch_dtype": getattr(torch, dtype)}
    if not local and revision:
        kwargs["revision"] = revision
    if unet is not None:
        cls = check_unet_folder(unet)
        try:
            kwargs["unet"] = getattr(diffusers, cls).from_pretrained(unet, torch_dtype=kwargs["torch_dtype"])
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise ModelError(f"could not load model.unet={unet}: {type(e).__name__}: {e}") from e
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and the likely fix
        where = "local folder" if local else "hub id (needs network access and, if gated, HF_TOKEN)"
        raise ModelError(f"could not load model.path={path} as a {where}: {type(e).__name__}: {e}") from e
    found = _detect_kind(pipe)
    if kind != ModelKind.auto and kind != found:
        raise ModelError(f"model.kind={kind.value} but {path} holds a {found.value} model ({type(pipe).__name__})")
    missing = [c for c in NEEDED[found] if getattr(pipe, c, None) is None]
    if missing:
        raise ModelError(f"{path} is a {found.value} model but lacks components {missing}")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return LoadedModel(pipe=pipe, kind=found, model_id=path if unet is None else f"{path}+unet={unet}", path=path)
