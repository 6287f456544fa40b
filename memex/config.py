"""Typed configuration: one dataclass per Hydra config group.

These are plain dataclasses (no Hydra import) so library modules take them as typed arguments.
`memex.cli` registers them as Hydra *schemas*: an unknown key, a value of the wrong type or an
enum value outside its choices fails while Hydra composes the config, naming the full key,
before any work starts. `validate_*` adds the range checks a type cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional


class MemexError(Exception):
    """Base of the errors memex reports to users: the message names the problem and the fix."""


class ConfigError(MemexError, ValueError):
    """A config value is wrong; the message names the key and the fix."""


class ModelKind(str, Enum):
    auto = "auto"  # detect from the checkpoint's components
    unconditional = "unconditional"  # UNet2DModel, pixel space (paper's CIFAR-10 setting)
    latent_text = "latent_text"  # Stable Diffusion 1.x/2.x layout: UNet + VAE + CLIP text encoder
    pixel_text = "pixel_text"  # text-conditional pixel model, no VAE (Imagen / DeepFloyd IF layout)


class SchedulerKind(str, Enum):
    default = "default"  # whatever the checkpoint's scheduler/ folder says
    ddim = "ddim"
    ddpm = "ddpm"
    pndm = "pndm"
    euler = "euler"
    euler_ancestral = "euler_ancestral"
    dpm_multistep = "dpm_multistep"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class PromptSource(str, Enum):
    file = "file"  # .txt (one per line), .jsonl or .parquet
    captions = "captions"  # training manifest captions, most duplicated first
    none = "none"  # unconditional models: one empty prompt


@dataclass
class ModelConfig:
    name: str = "model"  # short name used in run folder names and rows
    path: str = "???"  # local diffusers folder or hub id (org/name)
    kind: ModelKind = ModelKind.auto
    revision: Optional[str] = None  # hub revision; ignored for local folders


@dataclass
class SamplingConfig:
    samples_per_prompt: int = 4  # the paper uses 500
    batch_size: int = 8  # samples per UNet forward pass (x2 with classifier-free guidance)
    scheduler: SchedulerKind = SchedulerKind.default
    num_inference_steps: int = 50
    guidance_scale: float = 7.5  # <= 1 disables classifier-free guidance
    height: Optional[int] = None  # None: the UNet's native size
    width: Optional[int] = None
    dtype: DType = DType.float32
    seed: int = 0  # run seed; each sample's seed = f(run seed, prompt id, sample index)
    shard_size: int = 64  # samples per Parquet shard (the unit of resume)
    png_compress_level: int = 1  # zlib level 0-9; 1 is ~5x faster than 6 for ~10% more bytes


@dataclass
class PromptsConfig:
    source: PromptSource = PromptSource.file
    path: Optional[str] = None  # prompt file or training manifest (any fsspec URI)
    column: str = "prompt"  # text field in .jsonl / .parquet prompt files
    id_column: Optional[str] = None  # optional stable id field; default: hash of the text
    caption_column: str = "caption"  # caption field of a training manifest
    limit: Optional[int] = None  # keep the first N prompts (captions: the N most duplicated)


@dataclass
class StorageConfig:
    root: str = "runs"  # local folder or any fsspec URI (s3://bucket/prefix)
    options: Dict[str, Any] = field(default_factory=dict)  # fsspec/s3fs options (endpoint, keys)


@dataclass
class ResourcesConfig:
    address: Optional[str] = None  # Ray address; None: $RAY_ADDRESS or a new local instance
    min_actors: int = 1  # actor pool autoscales between min and max
    max_actors: int = 1
    num_gpus: float = 0.0  # per actor; 0 = run on CPU
    num_cpus: float = 1.0  # per actor
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class RunConfig:
    name: Optional[str] = None  # None: <model.name>-<hash of the generation settings>


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _at_least(key: str, value, low) -> None:
    if value is None or value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")


def validate_generate(cfg: GenerateConfig) -> None:
    """Range and consistency checks that types cannot express. Raises ConfigError naming the key."""
    if not cfg.model.path or cfg.model.path == "???":
        raise ConfigError("model.path is not set: give a diffusers folder or hub id (model.path=...)")
    s = cfg.sampling
    _at_least("sampling.samples_per_prompt", s.samples_per_prompt, 1)
    _at_least("sampling.batch_size", s.batch_size, 1)
    _at_least("sampling.num_inference_steps", s.num_inference_steps, 1)
    _at_least("sampling.shard_size", s.shard_size, 1)
    _at_least("sampling.seed", s.seed, 0)
    if not 0 <= s.png_compress_level <= 9:
        raise ConfigError(f"sampling.png_compress_level must be 0..9, got {s.png_compress_level}")
    for key in ("height", "width"):
        v = getattr(s, key)
        if v is not None and (v < 8 or v % 8):
            raise ConfigError(f"sampling.{key} must be a multiple of 8 and >= 8, got {v}")
    p = cfg.prompts
    if p.source in (PromptSource.file, PromptSource.captions) and not p.path:
        raise ConfigError(f"prompts.path is required when prompts.source={p.source.value}")
    if p.limit is not None:
        _at_least("prompts.limit", p.limit, 1)
    r = cfg.resources
    _at_least("resources.min_actors", r.min_actors, 1)
    _at_least("resources.max_actors", r.max_actors, r.min_actors)
    _at_least("resources.num_gpus", r.num_gpus, 0)
    _at_least("resources.num_cpus", r.num_cpus, 0)
    if r.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"resources.device must be auto, cpu or cuda, got {r.device!r}")
    if not cfg.storage.root:
        raise ConfigError("storage.root is empty: give a folder or URI (storage.root=s3://bucket/runs)")
    if cfg.run.name is not None and ("/" in cfg.run.name or not cfg.run.name.strip()):
        raise ConfigError(f"run.name must be a plain folder name, got {cfg.run.name!r}")
