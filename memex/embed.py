"""Image embedders for the membership index: uint8 images -> float32 vectors that FAISS searches.

This module owns every embedding model (with the sampler, the only code that puts a model on a
GPU). Three kinds, built by `make_embedder(embedder config, device)`:
  * pixels: weight-free; images resized to size x size, in [0, 1], flattened and scaled by
    1/sqrt(dim), so the squared l2 between two embeddings is the mean squared pixel difference and
    sqrt(FAISS L2 distance) = RMS pixel difference in [0, 1]: the paper's l2, directly comparable
    with its thresholds (0.15). Enough to find pixel-level copies, which is what the paper counts.
  * sscd: SSCD copy-detection descriptor (Pizzi et al. 2022; used by Somepalli et al. 2023,
    similarity >= 0.5 = likely copy). Its weights are published by facebookresearch/sscd-copy-detection
    as TorchScript files (e.g. sscd_disc_mixup.torchscript.pt, 512-d); the reference input is
    288 px (embedder=sscd sets size 288). Cosine similarity (metric "ip" on unit vectors).
  * clip: a CLIP image tower (transformers CLIPVisionModelWithProjection) from a local folder or
    a hub id, with the folder's CLIPImageProcessor when it has one. Cosine similarity. A folder that
    lacks weights of that tower (a CLIPVisionModel save: no projection) is refused, not filled at random.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from memex.config import EmbedderConfig, MemexError
from memex.console import library_logs_to_file

log = logging.getLogger("memex.embed")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SSCD's normalisation
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


class EmbedderError(MemexError, ValueError):
    """The embedder cannot be built or used; the message names the config key to fix."""


class Embedder:
    """uint8 (N, H, W, 3) RGB images -> float32 (N, dim) vectors, batch_size images per forward pass."""

    dim: int
    metric: str  # "l2" (FAISS IndexFlatL2: squared distances) or "ip" (unit vectors: cosine similarity)
    name: str  # kind + path + size; identifies the vectors in index cache keys
    batch_size: int = 64

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise EmbedderError(f"{self.name}: expected uint8 images of shape (N, H, W, 3), got {x.dtype} {x.shape}")
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            out = [self._embed(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def _embed(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _to_float(batch: np.ndarray, side: int | None, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, side, side) in [0, 1]; bilinear with antialiasing
    (what torchvision's Resize does) when the size changes, untouched when it already matches."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float() / 255.0
    if side is not None and x.shape[-2:] != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class PixelEmbedder(Embedder):
    """Resized pixels: squared l2 of two embeddings = mean squared pixel difference ([0, 1] scale)."""

    metric = "l2"

    def __init__(self, size: int = 32, batch_size: int = 256):
        self.size, self.batch_size = size, batch_size
        self.dim = 3 * size * size  # 3,072 at 32 px: 12 KB per image in a flat index
        self.name = f"pixels:{size}"
        self._scale = 1.0 / math.sqrt(self.dim)

    def _embed(self, batch: np.ndarray) -> np.ndarray:
        x = _to_float(batch, self.size)
        return (x.reshape(len(x), -1) * self._scale).numpy()


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_stamp(e: EmbedderConfig, storage_options: dict[str, Any] | None = None) -> str | None:
    """The version of the embedder's weights: each weight file's sha256 (local) or size + ETag (object
    stores, as the index key stamps training images' files); a cached hub id's weight blobs. None where there is
    nothing to stamp (pixels, a hub id not cached here, a path that is not there: the load names it).
    An index records it, and one reused with other weights at the same embedder.path is refused
    (memex/stages/index.py): its vectors are in the old weights' space, the queries in the new."""
    kind = getattr(e.kind, "value", e.kind)
    if kind == "pixels" or not e.path:
        return None
    try:
        fs, path = fsspec.core.url_to_fs(e.path, **(storage_options or {}))
        if fs.isfile(path):
            return _version(fs, path)
        if fs.isdir(path):
            files = sorted(f for f in fs.find(path) if f.endswith(WEIGHT_FILES))
            return "; ".join(f"{os.path.relpath(f, path)} {_version(fs, f)}" for f in files) or None
    except (OSError, ValueError):
        return None
    if kind == "clip" and HUB_ID.match(e.path):  # a hub id: its cached weight files' blobs
        folder = _cached_config(e.path)  # (the snapshot's commit moves with a model-card edit; a blob's name is
        if folder is None:  # the sha256 of its content)
            return None
        files = sorted(f for f in os.listdir(folder) if f.endswith(WEIGHT_FILES))
        return "; ".join(f"{f} blob {os.path.basename(os.path.realpath(os.path.join(folder, f)))[:16]}"
                         for f in files) or None
    return None


_HASHED: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: nightly's audits of one process hash once


def _version(fs, path: str) -> str:
    """A local file's sha256 (a copy of the same weights, a new mtime from a rebuilt image, is the same
    version; ~0.2 s for SSCD's 100 MB, ~3 s for CLIP ViT-L's 1.7 GB, once a process); an object store's
    size + ETag (no download)."""
    from memex.ingest import _stamp

    info = fs.info(path)
    if "file" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        return _stamp(info)
    import hashlib

    key = (path, info.get("size"), info.get("mtime"))
    if key not in _HASHED:
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        _HASHED[key] = f"sha256 {h.hexdigest()[:16]}"
    return _HASHED[key]


def _cached_config(repo_id: str) -> str | None:
    """The cached snapshot folder of a transformers hub id (its config.json), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        f = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - no cache, odd id
        return None
    return os.path.dirname(f) if isinstance(f, str) else None


def _sscd_missing(path: str) -> str:
    return (f"embedder.path={path} does not exist: download an SSCD TorchScript file "
            "(facebookresearch/sscd-copy-detection, e.g. sscd_disc_mixup.torchscript.pt) and set embedder.path=<file>")


def _sscd_unreadable(path: str, e: OSError) -> str:
    """A folder (the one holding the .pt) or a file this machine may not read: it was a raw IsADirectoryError
    or PermissionError from the preflight, naming no setting."""
    if isinstance(e, IsADirectoryError) or os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith(".pt"))[:3] if os.path.isdir(path) else []
        return (f"embedder.path={path} is a folder: set it to the SSCD TorchScript file in it"
                + (f" ({', '.join(found)})" if found else " (*.torchscript.pt)"))
    return f"embedder.path={path} cannot be read ({type(e).__name__}: {e}): check the file and its permissions"


class SSCDEmbedder(Embedder):
    """SSCD TorchScript descriptor: size x size input, ImageNet normalisation, L2-normalised output."""

    metric = "ip"

    def __init__(self, path: str, size: int = 288, device: str = "cpu", batch_size: int = 64,
                 storage_options: dict[str, Any] | None = None):
        self.size, self.device, self.batch_size = size, torch.device(device), batch_size
        self.name = f"sscd:{path}:{size}"
        try:
            with fsspec.open(path, "rb", **(storage_options or {})) as f:
                data = f.read()  # any fsspec URI; torch.jit.load reads from memory
        except FileNotFoundError:
            raise EmbedderError(_sscd_missing(path)) from None
        except OSError as e:
            raise EmbedderError(_sscd_unreadable(path, e)) from e
        try:
            self.model = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/ValueError for non-TorchScript files
            raise EmbedderError(f"embedder.path={path} is not a TorchScript model ({type(e).__name__}: {e}); "
                                "SSCD publishes *.torchscript.pt files: set embedder.path to one") from e
        self.dim = self._probe()

    def _probe(self) -> int:
        with torch.inference_mode():
            try:
                out = self.model(torch.zeros(1, 3, self.size, self.size, device=self.device))
            except Exception as e:  # noqa: BLE001 - re-raised naming the config key
                raise EmbedderError(f"{self.name}: the model rejects 3x{self.size}x{self.size} input "
                                    f"({type(e).__name__}: {e}); "
                                    "set embedder.size to a side it accepts (SSCD: 288)") from e
        if out.ndim != 2:
            raise EmbedderError(f"{self.name}: expected (N, dim) descriptors, "
                                f"the model returns shape {tuple(out.shape)}")
        return int(out.shape[1])

    def _embed(self, batch: np.ndarray) -> np.ndarray:
        x = _normalise(_to_float(batch, self.size, self.device), IMAGENET_MEAN, IMAGENET_STD)
        return F.normalize(self.model(x).float(), dim=1).cpu().numpy()


def _no_projection(path: str) -> str:
    return (f"embedder.path={path} is a CLIP vision tower saved without its projection "
            "(a CLIPVisionModel folder: no visual_projection weights), which transformers would "
            "fill with new random weights at every load: save the tower with its projection "
            "(CLIPVisionModelWithProjection.from_pretrained(<the whole CLIP>).save_pretrained(...)) "
            "or set embedder.path to the whole CLIPModel (e.g. openai/clip-vit-large-patch14)")


def _saved_keys(folder: str) -> set[str] | None:
    """The weight names a local transformers folder's safetensors hold, from the headers (or the shards'
    index) alone; None where there are none to read so cheaply (.bin files: the load tells)."""
    import json

    index = os.path.join(folder, "model.safetensors.index.json")
    try:
        if os.path.exists(index):
            with open(index) as f:
                return set(json.load(f)["weight_map"])
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(single):
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                return set(f.keys())
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable file: the load names it
    return None


def _check_loaded(path: str, model_type: str, info: dict[str, Any]) -> None:
    """Refuse a CLIP load that left weights out of the folder: transformers initialises them at random
    on every load (its MISSING report goes only to the log file), so the index, built by one load, and the
    queries, embedded by another, would be in different random spaces and the search silently wrong."""
    gaps = sorted(info.get("missing_keys") or ()) + sorted(str(k[0] if isinstance(k, tuple) else k)
                                                           for k in info.get("mismatched_keys") or ())
    if not gaps:
        return
    if model_type == "clip_vision_model" and all(k.startswith("visual_projection.") for k in gaps):
        # A CLIPVisionModel save: the tower without its projection. Its pooler_output (the CLS token before
        # the projection) would be deterministic, but it is not the CLIP image embedding that copy detection
        # and its published thresholds use (image_embeds, CLIPModel.get_image_features), nor an established
        # stand-in for it: refused, as is the folder that lacks any other weight.
        raise EmbedderError(_no_projection(path))
    raise EmbedderError(f"embedder.path={path} lacks {len(gaps)} weight(s) of the CLIP image tower "
                        f"({', '.join(gaps[:4])}{', ...' if len(gaps) > 4 else ''}), which transformers would fill "
                        "with new random weights at every load: set embedder.path to a complete CLIPModel or "
                        "CLIPVisionModelWithProjection folder or hub id")


class CLIPEmbedder(Embedder):
    """CLIP image tower: image_embeds (projection_dim) L2-normalised; cosine similarity."""

    metric = "ip"

    def __init__(self, path: str, size: int = 224, device: str = "cpu", batch_size: int = 64):
        library_logs_to_file()  # transformers 5 warns when CLIPImageProcessor falls back to PIL
        from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

        self.device, self.batch_size = torch.device(device), batch_size
        self.name = f"clip:{path}:{size}"
        try:  # the same calls for a local folder and a hub id
            config = top = AutoConfig.from_pretrained(path)
            if top.model_type == "clip":  # a whole CLIPModel (the hub's openai/clip-vit-*): its image tower,
                # whose projection width transformers 5 keeps only at the top level: a CLIPModel it saved
                # with projection_dim != 512 failed to load as a size mismatch of visual_projection
                config = top.vision_config
                config.projection_dim = top.projection_dim
            # float32 whatever the folder was saved in: transformers 5 loads a half-precision save as such ("auto"),
            # and its bf16 (8-bit mantissa) cosines blur the near-duplicate cut, and ran slowly on CPU
            model, info = CLIPVisionModelWithProjection.from_pretrained(path, config=config, dtype=torch.float32,
                                                                        output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - OSError (not found / offline), ValueError (not a CLIP checkpoint)
            raise EmbedderError(f"embedder.path={path} is not a loadable CLIP checkpoint ({type(e).__name__}: {e}); "
                                "set embedder.path to a local transformers folder or a reachable hub id") from e
        _check_loaded(path, top.model_type, info)
        self.model = model.to(self.device).eval()
        try:
            self.processor = CLIPImageProcessor.from_pretrained(path)
        except OSError:  # no preprocessor_config.json: square resize + OpenAI CLIP mean/std below
            self.processor = None
        self.side = int(self.model.config.image_size)
        if size < self.side:
            log.warning("%s: images arrive at %d px and are upsampled to the model's %d px; set embedder.size=%d",
                        self.name, size, self.side, self.side)
        self.dim = int(self._embed(np.zeros((1, self.side, self.side, 3), np.uint8)).shape[1])

    def _embed(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            if self.processor is not None:
                x = self.processor(images=list(batch), return_tensors="pt")["pixel_values"].to(self.device)
            else:
                x = _normalise(_to_float(batch, self.side, self.device), CLIP_MEAN, CLIP_STD)
            emb = self.model(pixel_values=x).image_embeds
        return F.normalize(emb.float(), dim=1).cpu().numpy()


def _model_type(folder: str) -> str | None:
    import json

    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # the load names it


def make_embedder(cfg: EmbedderConfig, device: str = "cpu", storage_options: dict[str, Any] | None = None) -> Embedder:
    """The embedder `embedder.*` asks for, on `device`; EmbedderError naming the config key when it
    cannot be built. storage_options: fsspec options for an sscd path on object storage."""
    kind = getattr(cfg.kind, "value", cfg.kind)  # the config enum or its string
    if cfg.size < 1 or cfg.batch_size < 1:
        raise EmbedderError(f"embedder.size and embedder.batch_size must be >= 1, got {cfg.size} and {cfg.batch_size}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise EmbedderError(f"embedder device {device!r} asked for but CUDA is not available: "
                            "set resources.device=cpu (or auto)")
    if kind == "pixels":
        return PixelEmbedder(cfg.size, cfg.batch_size)
    if kind not in ("sscd", "clip"):
        raise EmbedderError(f"embedder.kind={kind!r} is unknown: set embedder.kind to pixels, sscd or clip")
    if not cfg.path:
        what = "an SSCD TorchScript file" if kind == "sscd" else "a CLIP folder or hub id (org/name)"
        raise EmbedderError(f"embedder.kind={kind} needs a model: set embedder.path=... ({what})")
    check_embedder(cfg, storage_options)
    if kind == "sscd":
        return SSCDEmbedder(cfg.path, cfg.size, device, cfg.batch_size, storage_options)
    return CLIPEmbedder(cfg.path, cfg.size, device, cfg.batch_size)


def check_embedder(cfg: EmbedderConfig, storage_options: dict[str, Any] | None = None) -> None:
    """What can be told of embedder.path without loading it, for the audit's preflight: the index
    stage loads the model only after writing the training table into a new index folder (a copy of
    the training set's bytes for a manifest that embeds them). An sscd file exists and is a zip
    archive, as TorchScript files are; a local CLIP folder has a config.json, and a lone image tower's
    safetensors hold its projection; a hub id is left to the load."""
    kind, path = getattr(cfg.kind, "value", cfg.kind), cfg.path
    if kind == "sscd" and path:
        try:
            with fsspec.open(path, "rb", **(storage_options or {})) as f:
                head = f.read(4)
        except FileNotFoundError:
            raise EmbedderError(_sscd_missing(path)) from None
        except OSError as e:
            raise EmbedderError(_sscd_unreadable(path, e)) from e
        if head != b"PK\x03\x04":
            raise EmbedderError(f"embedder.path={path} is not a TorchScript model (not a zip archive, as "
                                "torch.jit.save writes them); SSCD publishes *.torchscript.pt files: set embedder.path "
                                "to one")
    elif kind == "clip" and path:
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
            raise EmbedderError(f"embedder.path={path} has no config.json: not a transformers CLIP folder "
                                "(save one with CLIPVisionModelWithProjection.save_pretrained, or give a hub id)")
        if os.path.isdir(path) and _model_type(path) == "clip_vision_model":
            keys = _saved_keys(path)
            if keys is not None and not any(k.startswith("visual_projection.") for k in keys):
                raise EmbedderError(_no_projection(path))
        if not os.path.exists(path) and not HUB_ID.match(path):
            raise EmbedderError(f"embedder.path={path} is neither an existing local folder nor a hub id (org/name): "
                                "set embedder.path=... to one")
