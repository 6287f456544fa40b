"""Typed configuration: one dataclass per Hydra config group.

These are plain dataclasses (no Hydra import) so library modules take them as typed arguments.
`memex.cli` registers them as Hydra *schemas*: an unknown key, a value of the wrong type or an
enum value outside its choices fails while Hydra composes the config, naming the full key,
before any work starts. `validate_*` adds the range checks a type cannot express.

The defaults here are the only defaults: each group's dataclass equals that group's default option
in conf/ (whose YAML is empty), and every other option lists only the keys it changes. The schema
comes first in each primary config's defaults list, so it supplies every key an option leaves out.
`memex <stage> --cfg job` prints the composed result.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

# conf/ at the top of a checkout (editable install, Ray working_dir) or memex/conf in a wheel;
# MEMEX_HOME (YAML: ${memex_home:}) is the folder holding it, where the demo model and data live.
_PKG = Path(__file__).resolve().parent
CONF_DIR = next((p for p in (_PKG.parent / "conf", _PKG / "conf") if (p / "generate.yaml").exists()),
                _PKG.parent / "conf")
MEMEX_HOME = str(CONF_DIR.parent)


def plain(obj: Any) -> Any:
    """Config dataclass -> JSON-able dict with enum values as strings (run.json, summaries, hashes)."""
    return json.loads(json.dumps(asdict(obj), default=lambda v: getattr(v, "value", str(v))))


ADDED_MODEL_KEYS = ("variant", "lora", "text_encoder")  # added after runs existed: in an identity only when set
# likewise per section, for the hashes of a whole config (nightly's config_sha256, a re-match's folder
# name, the index key): a key added later counts only when set, so ledgers and folders keep their names
ADDED_KEYS = {"model": ADDED_MODEL_KEYS, "index": ("train_size",), "trainset": ("alpha",), "mia": ("alpha",)}


def identity_text(c: dict) -> str:
    """A config dict as the text its identity hashes are taken of: sorted keys, ${memex_home:} paths (the
    demo's trainset) written back as the variable, so a checkout on a laptop and its copy in a Ray job's
    working_dir give the same hash (nightly's config_sha256, a re-match's folder name)."""
    return json.dumps(c, sort_keys=True).replace(MEMEX_HOME, "${memex_home:}")


def drop_unset_added(c: dict) -> dict:
    """A plain(config) dict (or one section of it, under its name) without the ADDED_KEYS left unset."""
    for section, keys in ADDED_KEYS.items():
        for k in keys:
            if isinstance(c.get(section), dict) and c[section].get(k) is None:
                c[section].pop(k, None)
    return c


def model_identity(model: Any) -> dict:
    """model.* as a run identity: allow_pickle decides whether the model loads, not its rows, and
    the keys added after runs existed count only when set: left out, so those runs resume."""
    return {k: v for k, v in plain(model).items()
            if k != "allow_pickle" and not (k in ADDED_MODEL_KEYS and v is None)}


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
    dpm_singlestep = "dpm_singlestep"
    lms = "lms"  # LMSDiscreteScheduler: needs scipy
    heun = "heun"  # 2nd order: two UNet calls per step
    kdpm2 = "kdpm2"
    kdpm2_ancestral = "kdpm2_ancestral"
    unipc = "unipc"
    deis = "deis"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class PromptSource(str, Enum):
    file = "file"  # .txt (one per line), .csv, .jsonl or .parquet
    captions = "captions"  # training manifest captions, most duplicated first
    none = "none"  # unconditional models: one empty prompt
    near_duplicates = "near_duplicates"  # memex audit: captions of data.path ranked by its index's near-dup counts


@dataclass
class ModelConfig:
    name: str = "local"  # short name used in run folder names and rows
    path: str = "???"  # local diffusers folder or hub id (org/name)
    kind: ModelKind = ModelKind.auto
    revision: Optional[str] = None  # hub revision; ignored for local folders
    # A fine-tuned UNet folder (config.json + weights, e.g. a trainer's checkpoint-<step>/unet) that
    # replaces the pipeline's own: `path` is then the base pipeline it was fine-tuned on.
    unet: Optional[str] = None
    # Pickle-only weights (diffusion_pytorch_model.bin, pytorch_model.bin, no .safetensors) are
    # refused: unpickling can run code. true: load them anyway, with torch.load(weights_only=True).
    # Not part of run or nightly identities: it decides whether a model loads, not what it generates.
    allow_pickle: bool = False
    # A diffusers weight variant: "fp16" reads diffusion_pytorch_model.fp16.safetensors (hub repos
    # ship such copies, and save_pretrained(variant="fp16") writes only them), each component
    # falling back to its standard file where it has no such copy. Part of the run identity when set.
    variant: Optional[str] = None
    # A LoRA fine-tune of `path` (memex/lora.py): the folder a diffusers LoRA training run wrote
    # (pytorch_lora_weights.safetensors), or the file; fused into the weights when loaded. Part of
    # the run identity when set.
    lora: Optional[str] = None
    # A fine-tuned text encoder folder that replaces the pipeline's own, as `unet` does the UNet:
    # diffusers' DreamBooth with --train_text_encoder saves checkpoint-<step>/text_encoder beside
    # checkpoint-<step>/unet, and an audit with the base's text encoder audits another model. Part
    # of the run identity when set.
    text_encoder: Optional[str] = None


@dataclass
class SamplingConfig:
    samples_per_prompt: int = 16  # the paper uses 500
    batch_size: int = 16  # samples per UNet forward pass (x2 with classifier-free guidance)
    scheduler: SchedulerKind = SchedulerKind.default
    num_inference_steps: int = 50
    guidance_scale: float = 7.5  # <= 1 disables classifier-free guidance
    height: Optional[int] = None  # None: the UNet's native size
    width: Optional[int] = None
    dtype: DType = DType.float32
    seed: int = 0  # run seed; each sample's seed = f(run seed, prompt id, sample index)
    shard_size: int = 64  # samples per Parquet shard (the unit of resume)
    png_compress_level: int = 1  # zlib level 0-9; 1 is ~5x faster than 6 for ~10% more bytes
    # UNet weights in channels_last memory format: the UNet forward measured 1.11x (demo, 32 px) and
    # 1.22x (SD 1.x layout, 64x64 latents) faster on CPU (bench/RESULTS.md, sampler speed); it moves
    # eps by ~3e-6, so it changes last float bits and is part of the run identity when true. Off by
    # default: existing runs keep their bytes, and its GPU effect is unmeasured here.
    channels_last: bool = False
    # VAE decode rows at a time (latent models); None: the whole batch, as diffusers' pipelines do. SD
    # 1.x's decoder holds ~0.8 GB an image at 512 px in float32 while it runs (bench/RESULTS.md,
    # VAE decode), 12 GB for a batch of 16: a smaller chunk caps it where GPU memory is short. It
    # moves a few pixels by 1 of 255 (other conv batch shapes), so it is part of the run identity when set.
    decode_batch_size: Optional[int] = None


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
    # <run>/_lease.json (memex/lease.py): one audit or generation at a time in a run folder
    lease_timeout_s: float = 300.0  # a lease with no heartbeat for this long is taken over
    lease_wait_s: float = 0.0  # wait this long for a run folder in use; 0: refuse at once, naming its owner
    # a local root (no protocol, file://) on a Ray cluster of more than one node is refused: each node
    # would write its units to its own disk. true: the path is a mount every node shares (NFS, Lustre)
    shared_mount: bool = False


class ExecutorKind(str, Enum):
    ray = "ray"  # Ray tasks and Ray Data actor pools: a cluster, or a local Ray instance
    # every unit in this process, in order, one model loaded once per stage: no Ray started. For one
    # box and for debugging (a breakpoint in a unit works). Each Ray actor pool starts a fresh
    # process that imports torch and diffusers before its first unit: ~10-15 s on 2 cores per stage,
    # and per adaptive round, against well under a second of work on a tiny model.
    local = "local"


@dataclass
class ResourcesConfig:
    executor: ExecutorKind = ExecutorKind.ray
    address: Optional[str] = None  # Ray address; None: $RAY_ADDRESS or a new local instance
    min_actors: int = 1  # actor pool autoscales between min and max
    max_actors: int = 1
    num_gpus: float = 0.0  # per actor; 0 = run on CPU
    num_cpus: float = 2.0  # per actor: torch threads (Ray sets OMP_NUM_THREADS)
    device: str = "auto"  # auto | cpu | cuda
    # How long a stage waits for a node that fits one worker (num_cpus, num_gpus) to join a cluster
    # that has none: an autoscaler launching a GPU node takes ~3-10 min. A Ray instance memex starts
    # on this machine cannot grow, so there a worker that fits no node fails at once.
    start_timeout_s: float = 900.0
    # The driver's cache of training images cut for pixel comparison (match, triage=preview), kept
    # across samples shards: ~3 MB each at 512 px (float32), so the default holds ~340. Its hits are
    # the speed of verification when a prompt's generations share neighbours (3.5x on the demo,
    # bench/bench_verify.py); lower it on a driver short of memory.
    pixel_cache_mb: int = 1024


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


def _at_least(key: str, value, low, finite: bool = True) -> None:
    """value >= low. NaN fails too: every comparison with it is False, so `value < low` let it through (a NaN
    settle time, lease timeout or GPU count ran as no setting at all). So does inf, unless the key takes it as
    "no limit" (finite=False: storage.lease_wait_s=inf waits for a run folder as long as it takes)."""
    if value is None or not value >= low:
        raise ConfigError(f"{key} must be {'a number ' if value != value else ''}>= {low}, got {value!r}")
    if finite and math.isinf(value):
        raise ConfigError(f"{key} must be a finite number >= {low}, got {value!r}")


def check_protocol(key: str, uri: Optional[str]) -> None:
    """A URI whose protocol fsspec does not know, or whose filesystem package is not installed
    (gs:// without gcsfs), fails here naming the key. It was an ImportError traceback from deep in
    the stage for storage.root, index.root, prompts.path and data.path. Chained URLs
    (simplecache::s3://...) check each protocol."""
    if not uri or "://" not in uri:
        return  # a local path (or unset: the key's own check names it)
    import fsspec  # here: the config module stays free of I/O imports

    from memex.storage import protocol_of  # here: memex.storage imports this module

    for part in uri.split("::"):
        proto = protocol_of(part) if "://" in part else part.lower()
        if not proto:  # a Windows drive letter, not a protocol
            continue
        try:
            fsspec.get_filesystem_class(proto)
        except ImportError as e:
            raise ConfigError(f"{key}={uri}: {proto}:// needs a package that is not installed ({e}): install it "
                              "on every node (docker/), or use s3:// or a local path") from None
        except ValueError:
            raise ConfigError(f"{key}={uri}: fsspec knows no protocol {proto}://: use a local path or "
                              "s3://bucket/prefix (or another fsspec protocol, its package installed)") from None


def validate_generate(cfg: GenerateConfig) -> None:
    """Range and consistency checks that types cannot express. Raises ConfigError naming the key."""
    if not cfg.model.path or cfg.model.path == "???":
        raise ConfigError("model.path is not set: give a diffusers folder or hub id (model.path=...)")
    check_model_name(cfg.model.name)
    for key in ("path", "unet", "lora", "text_encoder"):  # diffusers' from_pretrained reads a folder or a hub id
        v = getattr(cfg.model, key)
        if v and "://" in v:
            raise ConfigError(f"model.{key}={v}: models are read from a local or mounted folder, or a hub id, not "
                              "a URL: mount the bucket on every node (s3fs-fuse, Mountpoint for S3, FSx) or copy "
                              "the model there first (aws s3 sync); the runs can still go to storage.root=s3://...")
    s = cfg.sampling
    _at_least("sampling.samples_per_prompt", s.samples_per_prompt, 1)
    _at_least("sampling.batch_size", s.batch_size, 1)
    _at_least("sampling.num_inference_steps", s.num_inference_steps, 1)
    _at_least("sampling.shard_size", s.shard_size, 1)
    _at_least("sampling.seed", s.seed, 0)
    if not s.guidance_scale >= 0 or math.isinf(s.guidance_scale):  # NaN too: a negative scale ran as the text
        # prediction alone, without a word; inf made every pixel NaN
        raise ConfigError(f"sampling.guidance_scale must be >= 0 and finite (up to 1: the text prediction alone, no "
                          f"classifier-free guidance), got {s.guidance_scale}")
    if s.decode_batch_size is not None:
        _at_least("sampling.decode_batch_size", s.decode_batch_size, 1)
    if not 0 <= s.png_compress_level <= 9:
        raise ConfigError(f"sampling.png_compress_level must be 0..9, got {s.png_compress_level}")
    for key in ("height", "width"):
        v = getattr(s, key)
        if v is not None and (v < 8 or v % 8):
            raise ConfigError(f"sampling.{key} must be a multiple of 8 and >= 8, got {v}")
    p = cfg.prompts
    if p.source == PromptSource.near_duplicates and not isinstance(cfg, AuditConfig):
        raise ConfigError("prompts.source=near_duplicates needs the membership index: use `memex audit`, "
                          "or prompts=captions prompts.path=<manifest> with `memex generate`")
    if p.source in (PromptSource.file, PromptSource.captions) and not p.path:
        raise ConfigError(f"prompts.path is required when prompts.source={p.source.value}")
    # a prompt setting the source in force does not read fails instead of being ignored: e.g.
    # `prompts.source=none` over the demo's prompt file (the group option `prompts=none` clears it)
    unread = {PromptSource.file: ("caption_column",),
              PromptSource.captions: ("column", "id_column"),
              PromptSource.near_duplicates: ("path", "column", "id_column", "caption_column"),
              PromptSource.none: ("path", "column", "id_column", "caption_column", "limit")}[p.source]
    unused = _changed(p, unread)
    if unused:
        why = {PromptSource.file: "it reads prompts.column of a prompt file",
               PromptSource.captions: "it reads prompts.caption_column of a training manifest",
               PromptSource.near_duplicates: "it ranks the captions (trainset.caption_column) of trainset.path",
               PromptSource.none: "an unconditional model has one empty prompt"}[p.source]
        # preset=paper sets prompts.limit over the prompts option: the option cannot reset it, an override can
        drop = f"add prompts.{unused[0]}=null" if unused[0] == "limit" else f"drop prompts.{unused[0]}"
        raise ConfigError(f"prompts.{unused[0]} is set, and prompts.source={p.source.value} does not read it "
                          f"({why}): {drop} (a preset, e.g. preset=paper, may set it), or choose the prompts "
                          "option that reads it (prompts=file|captions|near_duplicates|none, which also resets the "
                          "other keys)")
    if p.limit is not None:
        _at_least("prompts.limit", p.limit, 1)
    validate_resources(cfg.resources)
    if s.dtype == DType.float16 and cfg.resources.device == "cpu":  # else found only when the model loads
        raise ConfigError("sampling.dtype=float16 needs a GPU, and resources.device=cpu runs the model on the CPU: "
                          "set sampling.dtype=float32 (or bfloat16), or resources.device=auto")
    validate_storage(cfg.storage)
    check_protocol("prompts.path", p.path)
    check_run_name(cfg.run.name)


def validate_storage(storage: "StorageConfig") -> None:
    """Where every command writes (generate, audit, nightly, mia): a root, a filesystem that reads it, and lease
    timings that work (a lease_timeout_s of 0 made the heartbeat thread rewrite _lease.json in a tight loop)."""
    if not storage.root:
        raise ConfigError("storage.root is empty: give a folder or URI (storage.root=s3://bucket/runs)")
    check_protocol("storage.root", storage.root)
    check_folder_path("storage.root", storage.root)
    # finite: a lease whose holder was killed would hold the run folder for good (and inf is no JSON number)
    _at_least("storage.lease_timeout_s", storage.lease_timeout_s, 1)
    # inf waits for the run folder as long as it takes (memex/lease.py polls towards a deadline of inf)
    _at_least("storage.lease_wait_s", storage.lease_wait_s, 0, finite=False)


def check_actor_devices(resources: "ResourcesConfig", dtype: "DType") -> None:
    """Before any work of a command that samples: a Ray actor given no GPU (resources.num_gpus=0) runs on
    the CPU (memex/models.py resolve_device), so float16 or resources.device=cuda failed at the first
    actor, after the index was built (`preset=paper model=sd15` without resources=gpu). Not part of
    validate_*: configs compose on a laptop for a GPU cluster; the run itself is refused."""
    if resources.executor == ExecutorKind.local:  # this process samples: its own device decides
        if dtype == DType.float16 or resources.device == "cuda":
            from memex.models import resolve_device  # torch: only for these settings

            if resolve_device(resources.device) == "cpu":  # (cuda with none visible raises there, naming the key)
                raise ConfigError("sampling.dtype=float16 needs a GPU, and this machine has none "
                                  "(resources.executor=local samples here): set sampling.dtype=float32 (or "
                                  "bfloat16), or run on a GPU machine")
        return
    if resources.executor != ExecutorKind.ray or resources.num_gpus:
        return
    if resources.device == "cuda":
        raise ConfigError("resources.device=cuda, and resources.num_gpus=0 gives each Ray actor no GPU: set "
                          "resources.num_gpus=1 (resources=gpu), or resources.device=auto to run on the CPU")
    if dtype == DType.float16:
        raise ConfigError("sampling.dtype=float16 needs a GPU, and resources.num_gpus=0 gives each Ray actor none "
                          "(they run on the CPU): set resources=gpu (resources.num_gpus=1), or sampling.dtype="
                          "float32 (or bfloat16)")


# fsspec's glob wildcards. memex finds a folder's files by pattern (a stage's units and markers, its rounds, the
# ledger's rows): a folder path holding one is read as a pattern too, so `runs/sd[ema]` (a character class) matched
# nothing and every stage "did not complete; rerun", and s3fs's move of each atomic write found no temp file
GLOB_CHARS = "[]*?"


def glob_chars(text: str) -> str:
    """The glob wildcards in `text`, in GLOB_CHARS order ("" for none)."""
    return "".join(c for c in GLOB_CHARS if c in (text or ""))


def _without_glob(name: str) -> str:
    """`sd[ema]` -> `sd-ema`: the example a refusal gives."""
    return re.sub(r"-*/-*", "/", re.sub(r"[\[\]*?]+", "-", name)).strip("-") or "my-run"


def check_folder_path(key: str, uri: Optional[str]) -> None:
    """A folder memex writes under (storage.root, index.root, nightly.ledger) whose path, a relative one as it
    resolves here, holds a glob wildcard: refused (see GLOB_CHARS)."""
    if not uri:
        return
    where = uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))
    found = glob_chars(where)
    if found:
        shown, fix = (uri, f"e.g. {key}={_without_glob(uri)}") if where == uri or glob_chars(uri) else \
            (f"{uri} ({where})", "e.g. an absolute path, or run from another folder")
        raise ConfigError(f"{key}={shown} holds {' '.join(found)}, which memex's file listings read as wildcards "
                          f"(its runs would not find their own files): use a folder whose path has none of "
                          f"{' '.join(GLOB_CHARS)}, {fix}")


def check_model_name(name: str | None) -> None:
    """model.name names run folders under storage.root: `memex generate`'s and the audit's <model.name>-<hash>
    (memex/stages/generate.py default_run_name), `memex mia`'s mia-<model.name>-<key>. A hub id's `/`
    (stabilityai/sd-2-1) nested the run one folder down; `..` (../../tmp/escape) wrote it outside storage.root."""
    if name is not None and glob_chars(name):
        raise ConfigError(f"model.name={name} holds {' '.join(glob_chars(name))}: it names the run folder under "
                          "storage.root (<model.name>-<hash>), whose files memex lists by pattern, where these are "
                          f"wildcards: give a name without them, e.g. model.name={_without_glob(name)}")
    if name is not None and "/" not in name and "\\" not in name and name.strip() not in ("", ".", ".."):
        return
    parts = [p.strip() for p in re.split(r"[/\\]", name or "") if p.strip() not in ("", ".", "..")]
    raise ConfigError(f"model.name={name!r} must be a plain folder name (no / or \\, not . or ..): it names the run "
                      f"folder under storage.root (<model.name>-<hash>): give a short name, e.g. "
                      f"model.name={parts[-1] if parts else 'my-model'}")


def check_run_name(name: str | None) -> None:
    """run.name is one folder under storage.root: `..` wrote the run into storage.root's parent (on
    S3, keys with a literal `..`), `.` into storage.root itself beside `_index/`."""
    if name is not None and ("/" in name or "\\" in name or not name.strip() or name.strip() in (".", "..")):
        raise ConfigError(f"run.name must be a plain folder name (no / or \\, not . or ..), got {name!r}")
    if name is not None and glob_chars(name):
        raise ConfigError(f"run.name={name} holds {' '.join(glob_chars(name))}: it names the run folder under "
                          "storage.root, whose files memex lists by pattern, where these are wildcards: give a name "
                          f"without them, e.g. run.name={_without_glob(name)}")
    if name in RESERVED_NAMES:
        raise ConfigError(f"run.name={name} is the folder memex keeps {RESERVED_NAMES[name]} in, "
                          "under storage.root: give the run another name")


# ---- memex train -------------------------------------------------------------------------
class ArchKind(str, Enum):
    unconditional = "unconditional"  # UNet2DModel + DDPM (the paper's CIFAR-10 models)
    pixel_text = "pixel_text"  # UNet2DConditionModel on pixels + frozen text encoder (IF layout)


@dataclass
class ArchConfig:
    kind: ArchKind = ArchKind.pixel_text
    resolution: int = 32  # training images are resized to resolution x resolution
    block_out_channels: List[int] = field(default_factory=lambda: [16, 32, 64])
    layers_per_block: int = 1
    attention_levels: int = 1  # (cross-)attention in the lowest N resolutions only: 8x8 at 32 px
    text_hidden: int = 64  # frozen CLIP-style text encoder width
    text_layers: int = 2
    max_length: int = 48  # tokens; the demo tokenizer is character level
    num_train_timesteps: int = 1000


@dataclass
class DuplicationGroup:
    copies: int = 1  # rows per image in the training set
    count: int = 0  # how many images get this many copies (chosen by data.duplication_seed) ...
    ids: List[str] = field(default_factory=list)  # ... or exactly these ids


@dataclass
class DataConfig:
    path: str = "???"  # training manifest (memex/manifest.py) or a datasets save_to_disk folder, any fsspec URI
    caption_column: str = "caption"
    duplication: List[DuplicationGroup] = field(default_factory=list)
    duplication_seed: int = 0
    resize: bool = True  # False: every image must already be resolution x resolution
    storage_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    steps: int = 5000
    batch_size: int = 32  # per process
    lr: float = 1e-3
    warmup_steps: int = 100
    cond_dropout: float = 0.1  # captions dropped to "" so classifier-free guidance works
    checkpoint_every: int = 500  # steps; resumable state under <output>/checkpoints/
    keep_checkpoints: int = 2
    mixed_precision: str = "no"  # accelerate: no | fp16 | bf16
    seed: int = 0
    log_every: int = 100


@dataclass
class TrainConfig:
    arch: ArchConfig = field(default_factory=ArchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output: str = "???"  # the diffusers folder written at the end (+ checkpoints/ while training)


def validate_resources(r: ResourcesConfig) -> None:
    _at_least("resources.min_actors", r.min_actors, 1)
    _at_least("resources.max_actors", r.max_actors, r.min_actors)
    _at_least("resources.num_gpus", r.num_gpus, 0)
    _at_least("resources.num_cpus", r.num_cpus, 0)
    # finite: Ray's placement group wait takes whole milliseconds (inf overflows it, after the index build)
    _at_least("resources.start_timeout_s", r.start_timeout_s, 0)
    _at_least("resources.pixel_cache_mb", r.pixel_cache_mb, 0)
    if r.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"resources.device must be auto, cpu or cuda, got {r.device!r}")
    if r.executor == ExecutorKind.local and r.address:
        raise ConfigError(f"resources.address={r.address} names a Ray cluster, but resources.executor=local "
                          "starts no Ray: drop one of the two")
    if r.executor == ExecutorKind.local:  # a setting of Ray's workers, silently ignored in this process: it fails here
        unused = _changed(r, tuple(RAY_ONLY_RESOURCES))
        if unused:
            k = unused[0]
            gpu = (" (resources=gpu sets it: for this machine's GPU, give resources.device=cuda instead)"
                   if k == "num_gpus" else "")
            raise ConfigError(f"resources.{k}={getattr(r, k):g} is set, and it is a setting of Ray's workers "
                              f"({RAY_ONLY_RESOURCES[k]}): resources.executor=local runs every unit in this process, "
                              f"with no Ray, and would ignore it: drop resources.{k}{gpu}, or run on Ray "
                              "(resources.executor=ray)")


# the resources.* keys only Ray's workers read (memex/runner.py remote_options, check_fits, the actor pool): with
# resources.executor=local every unit runs in the command's own process, on resources.device (auto: a GPU where one
# is visible) with torch's own threads; resources.device and resources.pixel_cache_mb (the driver's cache) still apply
RAY_ONLY_RESOURCES = {"num_gpus": "the GPUs each one is given",
                      "num_cpus": "the CPUs, and so the torch threads, each one is given",
                      "min_actors": "how many of them an actor pool starts with",
                      "max_actors": "how many of them an actor pool grows to",
                      "start_timeout_s": "how long a stage waits for a node that fits one to join"}


def validate_train(cfg: TrainConfig) -> None:
    a, t = cfg.arch, cfg.trainer
    if not cfg.output or cfg.output == "???":
        raise ConfigError("output is not set: give the folder to write the trained model to (output=...)")
    if "://" in cfg.output:  # pathlib would make a local folder named "s3:"
        raise ConfigError(f"output={cfg.output} is a URL, and memex train writes a local folder (checkpoints, "
                          "then save_pretrained): give a local path or a shared mount, and copy the folder to "
                          "object storage afterwards")
    if not cfg.data.path or cfg.data.path == "???":
        raise ConfigError("data.path is not set: give a training manifest (data.path=...)")
    check_protocol("data.path", cfg.data.path)
    _at_least("arch.layers_per_block", a.layers_per_block, 1)
    if not a.block_out_channels or any(c % 8 for c in a.block_out_channels):
        raise ConfigError(f"arch.block_out_channels must be multiples of 8 (GroupNorm groups), "
                          f"got {a.block_out_channels}")
    if not 0 <= a.attention_levels <= len(a.block_out_channels):
        raise ConfigError(f"arch.attention_levels must be 0..{len(a.block_out_channels)}, got {a.attention_levels}")
    factor = 2 ** (len(a.block_out_channels) - 1)
    if a.resolution < factor or a.resolution % factor:
        raise ConfigError(f"arch.resolution={a.resolution} cannot pass {len(a.block_out_channels)} UNet levels: "
                          f"it must be a multiple of {factor}")
    for key in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
        _at_least(f"trainer.{key}", getattr(t, key), 1)
    _at_least("trainer.warmup_steps", t.warmup_steps, 0)
    # the text encoder's (memex/tiny.py: 2 attention heads) and the noise schedule's: each failed in
    # transformers or diffusers after the data was decoded, leaving _tokenizer/ behind
    _at_least("arch.num_train_timesteps", a.num_train_timesteps, 2)
    if a.kind != ArchKind.unconditional:
        _at_least("arch.text_layers", a.text_layers, 1)
        _at_least("arch.max_length", a.max_length, 3)  # start and end tokens, and one of text
        if a.text_hidden < 2 or a.text_hidden % 2:
            raise ConfigError(f"arch.text_hidden must be an even width >= 2 (its 2 attention heads split it), "
                              f"got {a.text_hidden}")
    if not t.lr > 0:  # else torch's AdamW raises a traceback after the data is loaded
        raise ConfigError(f"trainer.lr must be > 0, got {t.lr}")
    if math.isinf(t.lr):  # every weight NaN after the first step
        raise ConfigError(f"trainer.lr must be a finite number, got {t.lr}")
    if not 0 <= t.cond_dropout < 1:  # 1: every caption dropped, a text model that never sees text
        raise ConfigError(f"trainer.cond_dropout must be in [0, 1) (the share of captions dropped), "
                          f"got {t.cond_dropout}")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"trainer.mixed_precision must be no, fp16 or bf16, got {t.mixed_precision!r}")
    if a.kind == ArchKind.unconditional:  # the text keys would be silently ignored
        unused = [f"arch.{k}" for k in _changed(a, ("text_hidden", "text_layers", "max_length"))]
        unused += [f"trainer.{k}" for k in _changed(t, ("cond_dropout",))]
        unused += [f"data.{k}" for k in _changed(cfg.data, ("caption_column",))]
        if unused:
            raise ConfigError(f"{unused[0]} is set, and arch.kind=unconditional has no text encoder or captions: "
                              f"drop {unused[0]}, or train a text model (arch=text_small)")
    for g in cfg.data.duplication:
        _at_least("data.duplication[].copies", g.copies, 1)
        _at_least("data.duplication[].count", g.count, 0)


# ---- memex audit: filter, index, match ---------------------------------------------------
class EmbedderKind(str, Enum):
    pixels = "pixels"  # resized, normalised pixels: weight-free, enough for pixel-level copies
    sscd = "sscd"  # SSCD copy-detection descriptor (TorchScript file), cosine similarity
    clip = "clip"  # CLIP image tower (transformers folder or hub id), cosine similarity


class IndexKind(str, Enum):
    flat = "flat"  # exact; fine up to a few million vectors per shard
    ivfpq = "ivfpq"  # IVF-PQ with exact re-ranking of the top k x refine_k


class DistanceKind(str, Enum):
    tiled_l2 = "tiled_l2"  # the paper's Stable Diffusion / Imagen distance (delta = 0.15)
    relative_l2 = "relative_l2"  # the paper's CIFAR-10 distance for small unconditional models (<= 1)


class CandidateSource(str, Enum):
    cliques = "cliques"  # the samples in each flagged prompt's largest clique (the paper's text-model filter)
    all = "all"  # every sample (the paper's unconditional setting; memex's default when the training set is at hand)


@dataclass
class FilterConfig:
    edge_threshold: float = 0.15  # tiled l2 below which two generations are "the same image"
    min_clique: int = 10  # the paper's 10
    max_expansions: int = 200_000  # branch-and-bound budget per prompt (memex/cliques.py)
    prompts_per_task: int = 16  # prompts handled by one Ray task


class Preprocess(str, Enum):
    """How a training image is brought to a generation's shape before any distance (memex/images.py)."""

    center_crop = "center_crop"  # resize the shorter side, crop the centre: Stable Diffusion's recipe
    resize = "resize"  # squash height and width separately (trainers that ignore the aspect ratio)
    pad = "pad"  # white borders to the aspect ratio (img2dataset's resize_mode=border pads with 255)


class Alpha(str, Enum):
    """What a training image's transparent pixels were to the model's trainer (memex/images.py decode)."""

    white = "white"  # composited onto white, as a viewer shows it: img2dataset, `memex train`
    drop = "drop"  # the alpha channel dropped, the hidden colours kept: PIL's convert("RGB"), diffusers' scripts


def alpha_name(alpha: Alpha | None) -> str:
    """trainset.alpha or mia.alpha as images.decode takes it: unset is white (Optional so that configs hashed
    before the key existed keep their hash: ADDED_KEYS)."""
    return alpha.value if alpha is not None else Alpha.white.value


@dataclass
class TrainingDataConfig:
    path: str = "???"  # manifest (memex/manifest.py), save_to_disk folder, .tar shards or images; any fsspec URI
    caption_column: str = "caption"
    preprocess: Preprocess = Preprocess.center_crop  # as the model was trained: index embeddings and verification
    # None: white. A logo with transparency trained by a script that does image.convert("RGB") (diffusers'
    # train_text_to_image) was learnt with the colours under its transparent pixels (often black): composited
    # onto white, an exact copy of it is ~1.0 tiled l2 away and never counts. drop reads it as that trainer did.
    alpha: Optional[Alpha] = None


@dataclass
class EmbedderConfig:
    kind: EmbedderKind = EmbedderKind.pixels
    path: Optional[str] = None  # sscd: TorchScript file; clip: folder or hub id
    size: int = 32  # pixels: side after resize (3*size^2 dims); sscd/clip: model input side
    batch_size: int = 256


@dataclass
class IndexConfig:
    kind: IndexKind = IndexKind.flat
    shards: int = 4  # FAISS shards, one Ray task each to build; match holds them all in one worker
    nlist: int = 1024
    pq_m: int = 16
    pq_nbits: int = 8
    nprobe: int = 32
    refine_k: int = 4
    decode_batch: int = 512  # training images decoded per step inside a shard task
    # IVF-PQ's k-means sample (rows of >= 1,024 evenly spaced row groups of train.parquet); None: max(65,536,
    # 39 x nlist), faiss's floor of 39 vectors a list (conf/index/ivfpq.yaml's 4,096 lists: 159,744; at
    # 65,536 faiss only warned, and the lists were trained on 16 vectors each)
    train_size: Optional[int] = None
    # near-duplicate threshold in the embedder's metric; None: the embedder's default (memex/index.py DUP_THRESHOLDS).
    # pixels: RMS pixel difference, in (0, 0.5], default 0.05; sscd/clip: cosine similarity, in [0.5, 1), default 0.95
    dup_threshold: Optional[float] = None
    dup_k: int = 64  # first-pass top-k of the near-duplicate counts; images with more are counted exactly beyond it
    root: Optional[str] = None  # None: <storage.root>/_index (shared by runs on the same data)


@dataclass
class MatchConfig:
    # all: with the training set at hand, matching a generation costs far less than generating it,
    # and on the demo it finds 11 of 11 reproduced pictures where the cliques find 5 (bench/RESULTS.md)
    candidates: CandidateSource = CandidateSource.all
    distance: DistanceKind = DistanceKind.tiled_l2
    threshold: float = 0.15  # tiled l2: 0.15 (paper); relative l2: 0.9 (match=relative; the paper's 1.0)
    k: int = 10  # nearest training images (by embedding) verified on pixels per candidate
    alpha: float = 0.5  # relative l2 only
    n_neighbors: int = 50  # relative l2 only: size of the reference set S
    # A picture counts as extracted when at least min_generations generations copy it (distance <=
    # threshold); a low-complexity picture (tile detail below the threshold: memex/distances.py)
    # needs low_detail_min_generations, or one copying generation in a flagged clique or closer to
    # it than its own tile mosaic. Chosen against brute-force truth (bench/RESULTS.md, "Which
    # verified generations count", and the sweep over three audit seeds: 0.15 x 1 has the best mean
    # recall, 0.939, one false alarm in three draws; 2 has none, at 0.879).
    min_generations: int = 1
    low_detail_min_generations: int = 2
    # tiled l2 only: a picture counts when one of its copying generations is at most max_margin times
    # as far from it as from the nearest other picture among the k neighbours (memex/stages/match.py
    # distinct_margin): a copy is distinctly closer to one picture; a generic look-alike (a yellow
    # triangle logo like several others, a patch of sky) is nearly as close to the next. Swept against
    # brute-force truth (bench/RESULTS.md, "Distinct copies"); None switches the test off.
    max_margin: Optional[float] = 0.6


class TriageKind(str, Enum):
    auto = "auto"  # noise_norm for text-conditional models, none for unconditional ones
    none = "none"  # no triage
    noise_norm = "noise_norm"  # Wen et al. (ICLR 2024): ||eps(x_t, prompt) - eps(x_t, "")||, first step(s)
    # seeds previews of triage.steps DDIM steps, each matched to the training index like a generation:
    # minus the smallest tiled l2 (AUC 0.87-0.94 on the demo, 0.72 on a weaker model, 8 x 10 steps: bench/RESULTS.md)
    preview = "preview"


@dataclass
class TriageConfig:
    """Per-prompt memorization score before any full generation (memex/stages/triage.py, docs/method.md#2-triage)."""

    kind: TriageKind = TriageKind.auto
    seeds: int = 4  # starting noises per prompt (preview: previews); seeds x steps x 2 UNet evaluations a prompt
    # noise_norm: first steps of the guided trajectory averaged (Wen et al.: 1 already gives AUC 0.96 on SD);
    # preview: the DDIM steps of each preview (conf/triage/preview.yaml: 8 previews x 10 steps)
    steps: int = 1
    prompts_per_task: int = 256  # prompts per actor call (the unit of resume)
    # keep only the `keep` highest-scoring prompts for generation (None: all prompts are sampled, and
    # triage informs the report and the adaptive budget). On the demo model the score is weak (AUC
    # 0.67-0.78, bench/RESULTS.md), so nothing is dropped by default.
    keep: Optional[int] = None


class BudgetKind(str, Enum):
    fixed = "fixed"  # sampling.samples_per_prompt for every prompt (the paper's generate-and-filter)
    adaptive = "adaptive"  # rounds: more samples only for prompts that show signs of memorization


@dataclass
class BudgetConfig:
    kind: BudgetKind = BudgetKind.fixed
    # adaptive: cumulative samples per prompt at the end of each round; the first (round-000) covers every
    # prompt (or the triage.keep best),
    # each later one only the prompts with a sign of memorization after the rounds before it:
    #   a generation verified as a copy, or one within continue_factor x match.threshold of its
    #   nearest training picture (a near miss), or a triage score continue_triage_z robust
    #   standard deviations above the median of the run's prompts.
    # Demo (bench/RESULTS.md): [4, 16] and 1.2 sample 252 instead of 384 generations and find all 11
    # reproduced pictures (not logo-0059, which the truth pool copies once); 2.0 lets every
    # duplicated prompt go on (384, logo-0059 too).
    rounds: List[int] = field(default_factory=lambda: [4, 16])
    continue_factor: float = 1.2
    continue_triage_z: Optional[float] = 3.0  # None: the triage score does not extend a prompt's budget


class TrackerKind(str, Enum):
    none = "none"  # log nothing beyond the run folder
    mlflow = "mlflow"  # metrics at the checkpoint's step, params, the report folder as artifacts (memex/tracking.py)
    tensorboard = "tensorboard"  # scalars at the checkpoint's step and a text summary in the training's log dir
    wandb = "wandb"  # metrics against memex/step, the report as run files; offline by default


class WandbMode(str, Enum):
    offline = "offline"  # a local run folder, uploaded later with `wandb sync` (no network)
    online = "online"  # needs WANDB_API_KEY (or `wandb login`) and the network


@dataclass
class TrackerConfig:
    """Where `memex audit` / `memex nightly` log an audit's headline numbers beside the training run's
    loss curves (memex/tracking.py). The audit's results are written before; a tracker that fails
    fails the command (nightly: the checkpoint's ledger row is an error, retried the next night)."""

    kind: TrackerKind = TrackerKind.none
    # training step of the audited checkpoint: the x of every metric (None: 0). `memex nightly` sets
    # it to each checkpoint's own step (checkpoint-<step>; a final model saved beside them: the last
    # one's), so leave it unset there.
    step: Optional[int] = None
    # mlflow, wandb: the run to log into. run_id: an existing run (the training run's id: its loss
    # curves and memex's numbers side by side). None: a run named run_name (mlflow: found by name in
    # the experiment, else created; wandb: a new run).
    run_id: Optional[str] = None
    run_name: Optional[str] = None  # None: the audit's run folder name; nightly: the series' path under its location
    # mlflow
    tracking_uri: Optional[str] = None  # None: MLflow's own ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)
    experiment: Optional[str] = None  # None: $MLFLOW_EXPERIMENT_NAME (or _ID), else MLflow's Default; created if new
    # tensorboard: the training's log dir (where its event files are), required
    log_dir: Optional[str] = None
    # wandb
    project: Optional[str] = None  # None: $WANDB_PROJECT, else memex
    entity: Optional[str] = None  # None: wandb's default entity
    mode: WandbMode = WandbMode.offline  # offline: no network, `wandb sync <dir>/wandb/offline-run-*` uploads
    dir: Optional[str] = None  # wandb writes its run folders under <dir>/wandb/; None: $WANDB_DIR, else here


# keys of TrackerConfig that only one kind reads: set with another kind they would do nothing
TRACKER_KEYS = {"tracking_uri": TrackerKind.mlflow, "experiment": TrackerKind.mlflow,
                "log_dir": TrackerKind.tensorboard, "project": TrackerKind.wandb, "entity": TrackerKind.wandb,
                "dir": TrackerKind.wandb}


def validate_tracker(t: TrackerConfig) -> None:
    kind = t.kind
    for key, owner in TRACKER_KEYS.items():
        if getattr(t, key) is not None and kind != owner:
            raise ConfigError(f"tracker.{key} is a setting of tracker={owner.value}, and tracker={kind.value} "
                              f"does not read it: set tracker={owner.value} or drop tracker.{key}")
    if kind in (TrackerKind.none, TrackerKind.tensorboard):
        for key in ("run_id", "run_name"):
            if getattr(t, key) is not None:
                raise ConfigError(f"tracker.{key} names an mlflow or wandb run, and tracker={kind.value} has none: "
                                  f"set tracker=mlflow or tracker=wandb, or drop tracker.{key}")
    if t.mode != WandbMode.offline and kind != TrackerKind.wandb:
        raise ConfigError(f"tracker.mode is a setting of tracker=wandb, and tracker={kind.value} does not read it")
    if kind == TrackerKind.none and t.step is not None:
        raise ConfigError("tracker.step is the x of the numbers logged to a tracker, and tracker=none logs nothing: "
                          "set tracker=mlflow|tensorboard|wandb or drop tracker.step")
    if t.step is not None:
        _at_least("tracker.step", t.step, 0)
    if kind == TrackerKind.tensorboard and not t.log_dir:
        raise ConfigError("tracker=tensorboard needs tracker.log_dir: the training's TensorBoard log dir "
                          "(where its event files are), so the audit's numbers appear beside its loss curves")
    for key in ("run_id", "run_name", "experiment", "project"):
        v = getattr(t, key)
        if v is not None and not str(v).strip():
            raise ConfigError(f"tracker.{key} is empty: give a value or leave it unset (null)")


@dataclass
class AuditRunConfig(RunConfig):
    # a finished run folder under storage.root (its name, or the path memex audit printed): match
    # its generations again with this command's filter, match, embedder, index and training-set
    # settings, generating nothing (a threshold sweep: memex/stages/rematch.py). None: generate.
    samples_from: Optional[str] = None


@dataclass
class AuditConfig(GenerateConfig):
    run: AuditRunConfig = field(default_factory=AuditRunConfig)
    triage: TriageConfig = field(default_factory=TriageConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    trainset: TrainingDataConfig = field(default_factory=TrainingDataConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)


def adaptive(cfg: AuditConfig) -> bool:
    """budget=adaptive for text models; an unconditional model's one prompt keeps the fixed budget
    (sampling.samples_per_prompt): there are no prompts to choose between."""
    return cfg.budget.kind == BudgetKind.adaptive and cfg.prompts.source != PromptSource.none


# folders memex writes under storage.root beside the run folders: a run of one of these names would write
# its run.json, samples/ and report/ among them
RESERVED_NAMES = {"_index": "the membership indexes (index.root's default)",
                  "_nightly": "memex nightly's ledger and trend page (nightly.ledger's default)"}


def _changed(section, keys: tuple[str, ...]) -> list[str]:
    """The keys of a config section (a dataclass) set away from the schema's defaults."""
    default = type(section)()
    return [k for k in keys if getattr(section, k) != getattr(default, k)]


@functools.lru_cache(maxsize=None)
def shipped_options(group: str) -> dict[str, dict]:
    """option -> what conf/<group>/<option>.yaml sets, as written (${memex_home:} paths unresolved), in name
    order: the one reader of the shipped option files (the checks here, memex/cli.py's kind-key checks)."""
    import yaml  # here: read once, and only by the checks that need it

    return {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted((CONF_DIR / group).glob("*.yaml"))}


@functools.lru_cache(maxsize=None)
def _shipped_values(group: str) -> dict[str, tuple]:
    """key -> the values the shipped options of conf/<group>/ set for it (filter=demo: min_clique 5)."""
    out: dict[str, tuple] = {}
    for values in shipped_options(group).values():
        for k, v in values.items():
            out[k] = out.get(k, ()) + (v,)
    return out


def _set_by_user(section, keys: tuple[str, ...], group: str) -> list[str]:
    """_changed, less the values a shipped option of conf/<group>/ sets: conf/audit.yaml and conf/nightly.yaml pick
    filter=demo (min_clique 5) for every model, which is no setting of the user's. (The option's value given as an
    override is let through with it: the config does not say where a value came from.)"""
    shipped = _shipped_values(group)
    return [k for k in _changed(section, keys) if getattr(section, k) not in shipped.get(k, ())]


def _at_home(value: str) -> str:
    """A shipped option's ${memex_home:} path in this checkout (MEMEX_HOME read now: a Ray job's working_dir)."""
    return value.replace("${memex_home:}", MEMEX_HOME)


def _local_path(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def _names_a_model(path: str) -> bool:
    """A local folder, or a hub id (org/name); a local path with nothing there is left to the preflight's
    "model.path=...: no such folder" (and an audit of planted samples loads no model)."""
    return os.path.isdir(os.path.expanduser(path)) or not path.startswith(("/", "~", "."))


def demo_models() -> dict[str, dict]:
    """The shipped demo models' options (model=demo, model=demo_uncond: the ones whose path is in the checkout)
    -> their name, kind and path (resolved)."""
    return {o: {**v, "path": _at_home(v["path"])} for o, v in shipped_options("model").items()
            if "${memex_home:}" in str(v.get("path", ""))}


def check_demo_option(cfg: AuditConfig) -> None:
    """model.path pointed at another model while the model option is still a shipped demo's (model=demo, the
    default): the demo's kind, name and tuning (conf/tune/audit_demo.yaml: 80 samples x 10 steps, guidance 3,
    2 copies of a picture) were applied to it without a word, and the preflight's kind refusal led to
    model.kind=... on top of them. Refused, naming model=local. Not for a re-match (run.samples_from): it loads no
    model, and its model.* must equal its source's, which a run folder written so before (or by memex generate,
    which has no demo tuning and allows it) recorded under the demo's name."""
    m = cfg.model
    if cfg.run.samples_from:
        return
    for option, demo in demo_models().items():
        if m.name != demo["name"] or not m.path or "://" in m.path or not _names_a_model(m.path) \
                or _local_path(m.path) == _local_path(demo["path"]):
            continue
        raise ConfigError(f"model.path={m.path} is set, and the model option is still model={option}, the shipped "
                          f"demo's (model=demo is the default): its name ({demo['name']}), kind (model.kind="
                          f"{m.kind.value}) and tuning (conf/tune/*_{option}.yaml: the demo's samples, steps, guidance "
                          f"and batch) are the shipped demo model's, and would be applied to {m.path}: add model=local "
                          "(any diffusers folder or hub id: model.kind=auto, the schema's sampling), or the model's "
                          "own option (model=sd15, model=sd21, ...)")


def validate_audit(cfg: AuditConfig) -> None:
    validate_generate(cfg)
    check_demo_option(cfg)
    validate_tracker(cfg.tracker)
    f, i, m = cfg.filter, cfg.index, cfg.match
    unused = _set_by_user(f, ("min_clique", "edge_threshold", "max_expansions", "prompts_per_task"), "filter")
    if unused and (cfg.model.kind == ModelKind.unconditional or cfg.prompts.source == PromptSource.none):
        # the filter stage runs only for prompted audits (memex/stages/audit.py): a filter setting on an unconditional
        # model was silently ignored, the user believing the audit changed
        k = unused[0]
        raise ConfigError(f"filter.{k}={getattr(f, k)} is set, and an unconditional model (prompts=none) runs no "
                          "clique filter: the filter groups the generations of one prompt, and such a model has no "
                          f"prompts (its samples share one empty one), so filter.{k} would be ignored: drop "
                          f"filter.{k}; every sample is matched to the training set, so tune that with match.* "
                          "(match.threshold, match.min_generations)")
    if not 0 < f.edge_threshold < 1:
        raise ConfigError(f"filter.edge_threshold must be in (0, 1) (tiled l2 of [0, 1] images), "
                          f"got {f.edge_threshold}")
    _at_least("filter.min_clique", f.min_clique, 2)
    _at_least("filter.prompts_per_task", f.prompts_per_task, 1)
    _at_least("filter.max_expansions", f.max_expansions, 0)  # the clique search raised it, after generation
    if cfg.prompts.source == PromptSource.none and m.candidates == CandidateSource.cliques:
        # the filter is skipped for one prompt (its N x N graph over every sample is unbounded): the audit
        # generated every sample, then failed at match ("no complete candidates/"), and again on every rerun
        raise ConfigError("match.candidates=cliques verifies the filter's cliques, and prompts=none (an unconditional "
                          "model's one empty prompt) has no filter stage: set match.candidates=all (every sample "
                          "matched, the paper's CIFAR-10 setting), e.g. after preset=paper")
    validate_budget(cfg)
    check_clique_reachable(cfg)
    src = cfg.run.samples_from
    if src is not None and not src.strip("/ "):
        raise ConfigError(f"run.samples_from must name a finished run folder under storage.root (its name, or its "
                          f"path as memex audit printed it), got {src!r}")
    if src is not None and src == cfg.run.name:
        raise ConfigError(f"run.name={src} is run.samples_from itself: a re-match writes a run folder of its "
                          "own; give another run.name, or leave it out (<samples_from>-m<hash of the settings>)")
    if not cfg.trainset.path or cfg.trainset.path == "???":
        raise ConfigError("trainset.path is not set: give the training set (Parquet manifest or image folder) "
                          "to match against")
    check_protocol("trainset.path", cfg.trainset.path)
    check_protocol("index.root", i.root)
    check_folder_path("index.root", i.root)
    if cfg.embedder.kind != EmbedderKind.pixels and not cfg.embedder.path:
        raise ConfigError(f"embedder.kind={cfg.embedder.kind.value} needs embedder.path "
                          "(a local file/folder or hub id)")
    if cfg.embedder.kind == EmbedderKind.pixels and cfg.embedder.path:
        raise ConfigError("embedder.path is set, and embedder=pixels (resized pixels) loads no model: set "
                          "embedder=sscd or embedder=clip, or drop embedder.path")
    unused = _changed(i, ("nlist", "pq_m", "pq_nbits", "nprobe", "refine_k", "train_size")) \
        if i.kind == IndexKind.flat else []
    if unused:
        raise ConfigError(f"index.{unused[0]} is set, and index=flat (exact search) does not read it (IVF-PQ's): "
                          f"set index=ivfpq, or drop index.{unused[0]}")
    _at_least("embedder.size", cfg.embedder.size, 4)
    _at_least("embedder.batch_size", cfg.embedder.batch_size, 1)
    for key in ("shards", "nlist", "pq_m", "nprobe", "refine_k", "decode_batch"):
        _at_least(f"index.{key}", getattr(i, key), 1)
    if i.train_size is not None:
        _at_least("index.train_size", i.train_size, 1)
    _at_least("index.dup_k", i.dup_k, 2)  # the image itself takes one of the k results
    from memex.index import EMBEDDER_METRIC, resolve_dup_threshold  # here: memex.index imports this module

    kind = getattr(cfg.embedder.kind, "value", cfg.embedder.kind)
    resolve_dup_threshold(i.dup_threshold, EMBEDDER_METRIC[kind], kind)  # the metric's range, before any work
    _at_least("match.k", m.k, 1)
    _at_least("match.min_generations", m.min_generations, 1)
    _at_least("match.low_detail_min_generations", m.low_detail_min_generations, 1)
    if m.max_margin is not None and not 0 < m.max_margin <= 1:
        raise ConfigError(f"match.max_margin must be in (0, 1] (a distance ratio) or null, got {m.max_margin}")
    # a setting of the other distance would be silently ignored: it fails here
    relative = m.distance == DistanceKind.relative_l2
    unused = _changed(m, ("max_margin", "low_detail_min_generations") if relative else ("alpha", "n_neighbors"))
    if relative and m.max_margin is None:  # switched off (preset=paper's): nothing for relative l2 to ignore
        unused = [k for k in unused if k != "max_margin"]
    if unused:
        raise ConfigError(f"match.{unused[0]} is set, and match.distance={m.distance.value} does not read it (it is "
                          f"for {'tiled_l2: match=tiled' if relative else 'relative_l2: match=relative'}): drop "
                          f"match.{unused[0]} or change the distance")
    if relative:
        _at_least("match.n_neighbors", m.n_neighbors, 2)
        if not m.threshold >= 0.5:  # NaN too: it passed this and the alpha x threshold test below
            raise ConfigError(f"match.threshold={m.threshold} with relative_l2: the paper's threshold is 1.0, "
                              "memex's 0.9 (set match=relative, or match.threshold=0.9)")
        # d = min l2 / (alpha x mean l2) <= 1 / alpha, as the minimum is at most the mean: from
        # threshold >= 1 / alpha on, every generation is a copy of its nearest picture (the paper: 0.5, 1.0)
        if not m.alpha > 0 or m.threshold * m.alpha >= 1:
            why = (f"match.alpha={m.alpha} with match.threshold={m.threshold}: relative l2 is at most 1 / alpha, "
                   "so every generation would count as a copy" if m.alpha > 0 else
                   f"match.alpha={m.alpha} must be > 0 (relative l2 divides by alpha x the mean distance)")
            raise ConfigError(f"{why}: keep alpha x threshold below 1 (the paper: alpha 0.5, threshold 1.0)")
    elif not 0 < m.threshold < 1:
        raise ConfigError(f"match.threshold must be in (0, 1) for tiled_l2 (paper: 0.15), got {m.threshold}")


def check_clique_reachable(cfg: AuditConfig) -> None:
    """The filter (every audit with prompts, whatever match.candidates) flags a prompt whose generations hold a
    clique of filter.min_clique: a prompt given fewer samples can never be flagged. It was refused only with
    match.candidates=cliques; with candidates=all (the default) the audit ran, flagged nothing, and a
    low-complexity picture's route through a flagged clique (one copying generation in it) never applied."""
    f, n = cfg.filter, cfg.sampling.samples_per_prompt
    if cfg.prompts.source == PromptSource.none:  # one prompt: no filter stage (validate_audit)
        return
    if adaptive(cfg):  # the last round is the most a prompt gets (validate_budget: it equals samples_per_prompt)
        most, what = cfg.budget.rounds[-1], f"budget=adaptive's last round, budget.rounds[-1]={cfg.budget.rounds[-1]}"
    else:
        most, what = n, "budget=fixed"
    if most < f.min_clique:
        raise ConfigError(f"sampling.samples_per_prompt={n} is below filter.min_clique={f.min_clique}: a prompt gets "
                          f"at most {most} samples ({what}), so no prompt can be flagged by the filter, nor a "
                          "low-complexity picture counted by one copy in a flagged clique: set "
                          f"filter.min_clique={most} (or lower), or sampling.samples_per_prompt={f.min_clique} "
                          "(or more)")


def validate_budget(cfg: AuditConfig) -> None:
    """Triage and the adaptive budget: settings that cannot work fail here, naming the key."""
    t, b = cfg.triage, cfg.budget
    if t.kind in (TriageKind.noise_norm, TriageKind.preview) and (cfg.model.kind == ModelKind.unconditional
                                                                   or cfg.prompts.source == PromptSource.none):
        raise ConfigError(f"triage={t.kind.value} scores prompts, and an unconditional model has none: set "
                          "triage=auto or triage=none")
    if t.kind == TriageKind.preview and cfg.match.distance != DistanceKind.tiled_l2 and not cfg.run.samples_from:
        # (a re-match generates nothing: no round is decided, and its source's previews are read as they are)
        raise ConfigError("triage=preview scores a prompt by its previews' tiled l2 to the training set, and "
                          "budget.continue_factor compares it with match.threshold: set match=tiled")
    unconditional = cfg.model.kind == ModelKind.unconditional or cfg.prompts.source == PromptSource.none
    if t.kind == TriageKind.none or unconditional:  # a triage setting would be silently ignored: it fails here
        unused = _changed(t, ("keep", "seeds", "steps", "prompts_per_task"))
        if unused and t.kind == TriageKind.none:
            raise ConfigError(f"triage.{unused[0]} is set, and triage=none computes no triage score: set triage=auto "
                              f"(or triage=noise_norm, triage=preview) or drop triage.{unused[0]}")
        if unused:  # triage=auto on an unconditional model (prompts=none): off, as it has no prompts to score
            raise ConfigError(f"triage.{unused[0]} is set, and an unconditional model (prompts=none) has no prompts "
                              f"to score, so triage is off: drop triage.{unused[0]}")
    if t.kind != TriageKind.none:
        _at_least("triage.seeds", t.seeds, 1)
        _at_least("triage.steps", t.steps, 1)
        _at_least("triage.prompts_per_task", t.prompts_per_task, 1)
        if t.keep is not None:
            _at_least("triage.keep", t.keep, 1)
        if t.kind != TriageKind.preview and t.steps > cfg.sampling.num_inference_steps:
            raise ConfigError(f"triage.steps={t.steps} is more than sampling.num_inference_steps="
                              f"{cfg.sampling.num_inference_steps}: triage scores the first steps of a generation")
    if not adaptive(cfg):  # the rounds are not used: a setting of them would be silently ignored, so it fails here
        unused = _changed(b, ("rounds", "continue_factor", "continue_triage_z"))
        if b.kind == BudgetKind.adaptive and list(b.rounds) == [4, cfg.sampling.samples_per_prompt]:
            # conf/budget/adaptive.yaml's own rounds (they end at samples_per_prompt): memex nightly's budget on an
            # unconditional model, which keeps the fixed one, was refused at any sample count but 16
            unused = [k for k in unused if k != "rounds"]
        if unused and b.kind == BudgetKind.fixed:
            raise ConfigError(f"budget.{unused[0]} is set, but budget=fixed gives every prompt "
                              "sampling.samples_per_prompt samples and does not read it: add budget=adaptive, or "
                              f"drop budget.{unused[0]}")
        if unused:
            raise ConfigError(f"budget.{unused[0]} is set, but an unconditional model (prompts=none) keeps the fixed "
                              "budget, sampling.samples_per_prompt samples, and does not read it: drop "
                              f"budget.{unused[0]}")
        return
    if not b.rounds:
        raise ConfigError("budget.rounds is empty: give the cumulative samples per prompt after each round, "
                          "e.g. budget.rounds=[4,16]")
    _at_least("budget.rounds[0]", b.rounds[0], 1)
    n = cfg.sampling.samples_per_prompt
    for k in range(1, len(b.rounds)):
        if b.rounds[k] <= b.rounds[k - 1]:
            # conf/budget/adaptive.yaml ends its rounds at sampling.samples_per_prompt: 4 samples give [4, 4]
            hint = (f"; budget=adaptive's rounds end at sampling.samples_per_prompt={n}: sample more than "
                    f"{b.rounds[k - 1]} a prompt, give budget.rounds of your own, or set budget=fixed"
                    if k == len(b.rounds) - 1 and b.rounds[k] == n else "")
            raise ConfigError(f"budget.rounds must increase (each is the cumulative samples per prompt after "
                              f"that round), got {list(b.rounds)}{hint}")
    if n != b.rounds[-1]:  # the last round is the most a prompt gets: samples_per_prompt would be ignored
        fix = f"budget.rounds=[{b.rounds[0]},{n}]" if n > b.rounds[0] else f"sampling.samples_per_prompt={b.rounds[-1]}"
        raise ConfigError(f"sampling.samples_per_prompt={n}, but budget=adaptive gives a prompt at most its last "
                          f"round, budget.rounds[-1]={b.rounds[-1]} samples: make the two equal (e.g. {fix}), or "
                          "set budget=fixed")
    if t.kind == TriageKind.none and _changed(b, ("continue_triage_z",)):
        raise ConfigError("budget.continue_triage_z is set, and triage=none computes no triage score for it to "
                          "compare: set triage=auto, or drop budget.continue_triage_z")
    if cfg.match.candidates == CandidateSource.cliques:
        raise ConfigError("budget=adaptive decides each round from the matches of the round before, and "
                          "match.candidates=cliques matches only after the last one: set match.candidates=all "
                          "(or budget=fixed)")
    # NaN fails; inf is kept: every generation is then a near miss and every prompt gets every round (the fixed
    # budget, in rounds), as continue_triage_z=inf extends no prompt by its score (null's effect)
    if not b.continue_factor >= 1:
        raise ConfigError(f"budget.continue_factor must be >= 1 (a near miss is within that many times "
                          f"match.threshold), got {b.continue_factor}")
    if b.continue_triage_z is not None and not b.continue_triage_z > 0:  # 0 or less: the median prompt stands out
        raise ConfigError(f"budget.continue_triage_z must be > 0 (robust standard deviations above the median "
                          f"score), got {b.continue_triage_z}: at 0 or below it extends half the prompts or more; "
                          "null turns the rule off")


# ---- memex nightly -------------------------------------------------------------------------
class NightlyAction(str, Enum):
    run = "run"  # audit every checkpoint not yet in the ledger, in this process
    plan = "plan"  # print "<submission id> <checkpoint>" per pending checkpoint (one `ray job submit` each)


@dataclass
class NightlyConfig:
    location: str = "???"  # folder holding checkpoints (memex/checkpoints.py: what is recognised)
    base_model: Optional[str] = None  # pipeline that checkpoint-<step>/unet folders fine-tune; None: enclosing folder
    ledger: Optional[str] = None  # None: <storage.root>/_nightly (ledger rows + the trend page)
    budget: Optional[int] = 0  # fail when a checkpoint extracts more unique training images than this; None: no gate
    growth_margin: Optional[int] = 0  # fail when it extracts more than this over the previous step; None: no gate
    webhook: Optional[str] = None  # http(s) URL that receives the night's result as a JSON POST
    webhook_timeout_s: float = 10.0
    settle_minutes: float = 10.0  # skip checkpoints with files younger than this (a trainer may be writing)
    # audit checkpoint-<step>/unet_ema (diffusers' --use_ema) instead of unet/: the EMA weights are what
    # the run's final pipeline ships, unet/ the raw ones training resumes from
    ema: bool = False
    only: Optional[str] = None  # audit just this checkpoint folder (the per-checkpoint job of a plan)
    night: Optional[str] = None  # plan: the night in submission ids (YYYY-MM-DD); None: today, UTC
    action: NightlyAction = NightlyAction.run


@dataclass
class NightlyAuditConfig(AuditConfig):
    nightly: NightlyConfig = field(default_factory=NightlyConfig)


def validate_nightly(cfg: NightlyAuditConfig) -> None:
    n = cfg.nightly
    if not n.location or n.location == "???":
        raise ConfigError("nightly.location is not set: give the folder that holds the checkpoints "
                          "(nightly.location=...)")
    for key in ("budget", "growth_margin"):
        if getattr(n, key) is not None:
            _at_least(f"nightly.{key}", getattr(n, key), 0)
    _at_least("nightly.settle_minutes", n.settle_minutes, 0)  # finite: at inf no checkpoint would ever settle
    if not n.webhook_timeout_s > 0 or math.isinf(n.webhook_timeout_s):  # inf: the socket's OverflowError, at the POST
        raise ConfigError(f"nightly.webhook_timeout_s must be > 0 and finite, got {n.webhook_timeout_s}")
    if n.night is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", n.night):
        raise ConfigError(f"nightly.night must be a date YYYY-MM-DD, got {n.night!r}")
    check_protocol("nightly.ledger", n.ledger)
    check_folder_path("nightly.ledger", n.ledger)
    if n.webhook is not None and not n.webhook.lower().startswith(("http://", "https://")):  # (HTTPS:// too)
        # the value is not repeated: a webhook's URL is its capability (memex/redact.py); a host it starts with is
        scheme = re.match(r"([A-Za-z][A-Za-z0-9+.\-]{0,19})://", n.webhook)
        host = re.match(r"[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}(?=[/:?#]|$)", n.webhook)
        got = (f"the scheme {scheme.group(1)}://" if scheme else
               f"no scheme (it starts with the host {host.group(0)})" if host else "no scheme")
        raise ConfigError(f"nightly.webhook must be an http:// or https:// URL, got {got}: give it as "
                          "https://host/path (the value is not repeated here: it is a credential)")
    if n.webhook is not None:
        from urllib.parse import urlsplit

        try:  # a port that is not a number (https://host:abc/x) was found at the POST, after the night's audits
            parts = urlsplit(n.webhook)
            parts.port  # noqa: B018 - raises ValueError for such a port
        except ValueError as e:
            raise ConfigError(f"nightly.webhook is not a valid URL ({e}): give it as https://host[:port]/path") from e
        if not parts.hostname:
            raise ConfigError("nightly.webhook has no host: give it as https://host[:port]/path")
    # settings this action does not read fail instead of being ignored
    if n.night is not None and n.action != NightlyAction.plan:
        raise ConfigError("nightly.night names the night in nightly.action=plan's submission ids, and "
                          f"nightly.action={n.action.value} prints none: drop nightly.night, "
                          "or add nightly.action=plan")
    if n.webhook is None and _changed(n, ("webhook_timeout_s",)):
        raise ConfigError("nightly.webhook_timeout_s is set, and no nightly.webhook is: give the webhook URL "
                          "(nightly.webhook=https://...), or drop nightly.webhook_timeout_s")
    if cfg.tracker.step is not None:
        raise ConfigError("tracker.step: memex nightly logs each checkpoint at its own training step "
                          "(checkpoint-<step>); drop tracker.step")
    for key in ("unet", "lora", "text_encoder"):  # were replaced per checkpoint without a word
        if getattr(cfg.model, key) is not None:
            raise ConfigError(f"model.{key}: memex nightly takes each checkpoint's own from its folder "
                              "(checkpoint-<step>/unet, checkpoint-<step>/text_encoder, checkpoint-<step>/"
                              f"pytorch_lora_weights.safetensors) and loads it on nightly.base_model; drop model.{key}")
    if cfg.run.name is not None:  # replaced per checkpoint, and run is not in the config hash: ignored silently
        raise ConfigError("run.name: memex nightly names each checkpoint's run folder <checkpoint>-<weights hash>-"
                          "<config hash>; drop run.name")
    if cfg.run.samples_from is not None:
        raise ConfigError("run.samples_from: memex nightly generates anew for each checkpoint; drop it (re-match "
                          "one checkpoint's run folder with memex audit run.samples_from=<run>)")
    # model.path/name and run.name are replaced per checkpoint: model=local (a base given as nightly.base_model,
    # or pipelines found whole) needs no model.path of its own, which was demanded and then thrown away
    unset = not cfg.model.path or cfg.model.path == "???"
    if unset and cfg.trainset.path in ("/training_manifest.parquet", "training_manifest.parquet"):
        # trainset=demo (the default) is ${model.path}/training_manifest.parquet: with model=local's path unset it
        # read "/training_manifest.parquet: no such file", a path the user never wrote
        raise ConfigError("trainset=demo reads the model folder's own training_manifest.parquet, and memex nightly "
                          "with model=local has no model.path: give the training set, trainset=manifest "
                          "trainset.path=<manifest or folder>")
    check_nightly_trainset(cfg)
    if "://" in n.location:  # discovery lists a folder (memex/checkpoints.py); unset model.path's message named it
        raise ConfigError(f"nightly.location={n.location}: checkpoints are read from a local or mounted folder, not a "
                          "URL: mount the bucket on every node (s3fs-fuse, Mountpoint for S3, FSx) or sync the "
                          "checkpoints there first; the runs and the ledger can still go to storage.root=s3://...")
    validate_audit(replace(cfg, model=replace(cfg.model, path=n.location)) if unset else cfg)


def check_nightly_trainset(cfg: NightlyAuditConfig) -> None:
    """memex nightly replaces model.* per checkpoint, never trainset.path. The defaults (model=demo, trainset=demo)
    kept the demo's training set for any nightly.location: every checkpoint was matched against the demo's 256
    logos (~0 extracted: the gate passed). And trainset=demo under another model option derived a path from a
    model.path the nightly throws away (model=sd15's: stable-diffusion-v1-5/stable-diffusion-v1-5/
    training_manifest.parquet, relative), failing each checkpoint's audit on a path the user never wrote."""
    n, m, path = cfg.nightly, cfg.model, cfg.trainset.path
    if "://" in path or "://" in n.location:
        return
    demos = demo_models()
    demo_paths = {_local_path(d["path"]) for d in demos.values()}
    demo_ckpts = _local_path(_at_home(shipped_options("nightly")["demo"]["location"]))
    location = _local_path(n.location)
    # the demo's checkpoints: nightly=demo's folder (and below it), or checkpoint-<step>/unet folders on a demo model
    ours = location == demo_ckpts or location.startswith(demo_ckpts + os.sep) or \
        (n.base_model is not None and "://" not in n.base_model and _local_path(n.base_model) in demo_paths)
    manifests = {_local_path(os.path.join(d["path"], "training_manifest.parquet")): o for o, d in demos.items()}
    if _local_path(path) in manifests and not ours:
        raise ConfigError(f"trainset.path={path} is the demo's training set (model={manifests[_local_path(path)]}'s, "
                          f"what trainset=demo, the default, reads), and nightly.location={n.location} is not the "
                          f"demo's checkpoints ({demo_ckpts}, or fine-tunes with nightly.base_model a demo model): "
                          "its checkpoints would each be matched against the demo's logos (~0 extracted: the gate "
                          "passes). Give the model and the training set of these checkpoints: model=local (or their "
                          "option, e.g. model=sd15) trainset=manifest trainset.path=<the training set of these "
                          "checkpoints>")
    if m.path and path == f"{m.path}/training_manifest.parquet" and _local_path(m.path) not in demo_paths \
            and not os.path.exists(os.path.expanduser(path)):
        hub = not m.path.startswith(("/", "~", ".")) and not os.path.isdir(os.path.expanduser(m.path))
        raise ConfigError(f"trainset.path={path} does not exist: trainset=demo (the default) reads the "
                          "training_manifest.parquet that `memex train` saves beside its model, in model.path="
                          f"{m.path}, {'a hub id' if hub else 'which holds none'} (memex nightly audits the weights "
                          "found under nightly.location; model= gives their kind): give the training set of these "
                          "checkpoints, trainset=manifest trainset.path=<manifest or folder>")


# ---- memex mia: membership inference (memex/mia.py, memex/stages/mia.py, docs/method.md) ----
class MiaAttack(str, Enum):
    loss = "loss"  # denoising error at one timestep (Carlini et al.)
    pia = "pia"  # proximal initialization (Kong et al. 2024)
    secmi = "secmi"  # DDIM t-error (Duan et al. 2023)


# the attack each mia.* setting belongs to: set while that attack is off, it is refused (validate_mia); its
# range is checked against the model's timesteps only when the attack runs (mia.check_settings)
MIA_KEY_OWNERS = {"loss_timestep": MiaAttack.loss, "draws": MiaAttack.loss, "pia_timestep": MiaAttack.pia,
                  "secmi_timestep": MiaAttack.secmi, "secmi_k": MiaAttack.secmi}


@dataclass
class ImageSetConfig:
    path: str = "???"  # manifest (memex/manifest.py), save_to_disk folder, .tar shards or images; any fsspec URI
    caption_column: str = "caption"  # text models are scored with each image's caption


@dataclass
class QuerySetConfig:
    # images whose membership is the question ("was this picture in the training set?"): scored
    # like the others, not used in the metrics; each gets a p-value against the non-members
    path: Optional[str] = None
    caption_column: str = "caption"


@dataclass
class MiaSettings:
    """The `mia` group; memex/mia.py takes it as is (MiaScorer(model, settings))."""

    attacks: List[MiaAttack] = field(default_factory=lambda: [MiaAttack.loss, MiaAttack.pia, MiaAttack.secmi])
    loss_timestep: int = 100  # Carlini et al.: t near 100 of 1000
    pia_timestep: int = 200  # Kong et al.
    secmi_timestep: int = 100  # Duan et al.: t_sec = 100, interval 10
    draws: int = 4  # noise draws averaged by the loss attack
    secmi_k: int = 10  # DDIM inversion steps 0 -> secmi_timestep
    batch_size: int = 16  # rows per UNet call; the last batch is padded to this shape
    seed: int = 0  # with the image id, seeds each image's noise: a rerun scores identically
    # how an image is brought to the model's square resolution; None: as the model was trained,
    # resize for a `memex train` model (it squashes; memex_train.json says so), else center_crop
    # (Stable Diffusion's recipe). A member prepared otherwise is scored on pixels it never saw.
    preprocess: Optional[Preprocess] = None
    # what the trainer made of a transparent image's hidden pixels (trainset.alpha's choices). None: white, as
    # a viewer, img2dataset and `memex train` composite them; drop: the colours under them kept, as diffusers'
    # train_text_to_image (image.convert("RGB")) trained on them: a red disc on black under alpha 0, composited
    # onto white, is 167 grey levels a pixel from what such a model saw, and its loss read as a non-member's
    alpha: Optional[Alpha] = None
    images_per_unit: int = 256  # images per scoring unit (one Parquet shard, the unit of resume)
    # LiRA (Carlini et al. 2022): shadow models trained with `memex train` on random halves of
    # members + non-members, one Ray task each; 0 = off, else an even number >= 2 (16 in the paper)
    shadow_models: int = 0
    # training steps per shadow. None: as many passes over its half as the target made over its set
    # (target steps x the half's rows / the target's rows, from its memex_train.json): 3,143-4,196 on the demo
    shadow_steps: Optional[int] = None


@dataclass
class MiaConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    members: ImageSetConfig = field(default_factory=ImageSetConfig)  # images in the training set
    nonmembers: ImageSetConfig = field(default_factory=ImageSetConfig)  # same distribution, held out
    queries: QuerySetConfig = field(default_factory=QuerySetConfig)  # unknown membership: the question
    mia: MiaSettings = field(default_factory=MiaSettings)
    storage: StorageConfig = field(default_factory=StorageConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: RunConfig = field(default_factory=RunConfig)


def validate_mia(cfg: MiaConfig) -> None:
    validate_resources(cfg.resources)
    check_run_name(cfg.run.name)
    check_model_name(cfg.model.name)  # the run folder's default name: mia-<model.name>-<key>
    validate_storage(cfg.storage)  # (not checked here before: a lease_timeout_s of 0 made a stream of PUTs on S3)
    m = cfg.mia
    if not m.attacks:
        raise ConfigError(f"mia.attacks is empty: choose from {[a.value for a in MiaAttack]}")
    if len(set(m.attacks)) != len(m.attacks):
        raise ConfigError(f"mia.attacks lists an attack twice: {[a.value for a in m.attacks]}")
    for key in ("draws", "secmi_k", "batch_size", "images_per_unit"):
        _at_least(f"mia.{key}", getattr(m, key), 1)
    if m.shadow_models and (m.shadow_models < 2 or m.shadow_models % 2):
        raise ConfigError(f"mia.shadow_models must be >= 2 and even for LiRA (each image in half of them), "
                          f"got {m.shadow_models}; 0 turns LiRA off")
    if m.shadow_steps is not None:
        _at_least("mia.shadow_steps", m.shadow_steps, 1)
    if not m.shadow_models and m.shadow_steps is not None:
        raise ConfigError("mia.shadow_steps is set, and LiRA is off (mia.shadow_models=0) so no shadow is trained: "
                          "drop it, or set mia.shadow_models (mia=lira)")
    owners = MIA_KEY_OWNERS
    unused = [k for k in _changed(m, tuple(owners)) if owners[k] not in m.attacks]
    if unused:  # else silently ignored
        raise ConfigError(f"mia.{unused[0]} is set, and it is a setting of the {owners[unused[0]].value} attack, "
                          f"which mia.attacks={[a.value for a in m.attacks]} does not run: drop it, or add "
                          f"{owners[unused[0]].value} to mia.attacks")
    for key in ("members", "nonmembers"):
        path = getattr(cfg, key).path
        if not path or path == "???":
            raise ConfigError(f"{key}.path is not set: a Parquet manifest or image folder ({key}.path=...)")
    for key, path in (("members.path", cfg.members.path), ("nonmembers.path", cfg.nonmembers.path),
                      ("queries.path", cfg.queries.path)):
        check_protocol(key, path)
    if cfg.queries.path is None and _changed(cfg.queries, ("caption_column",)):
        raise ConfigError("queries.caption_column is set, and no queries.path is: give the images to question "
                          "(queries.path=...), or drop queries.caption_column")
    if cfg.members.path == cfg.nonmembers.path:
        raise ConfigError(f"members.path and nonmembers.path are the same ({cfg.members.path}): "
                          "non-members must be images held out of training")
    if m.shadow_models and MiaAttack.loss not in m.attacks:
        raise ConfigError("LiRA (mia.shadow_models > 0) compares the target's loss with the shadows': "
                          "keep loss in mia.attacks")
