"""`memex train`: small diffusion models trained on a manifest with a duplication schedule.

The paper trains many small models to see what makes them memorize (duplication, quality); this
module does the same with accelerate, so one code path runs on this CPU and on several GPUs
(`accelerate launch jobs/train.py ...`).

    1. check inputs (config ranges, seed and precision on this device, manifest, every image decodable at
       the model's resolution: every row checked, one error for all) and take output's lease
    2. expand the manifest by the duplication schedule -> the exact training set, saved with the model
    3. build the model from config: UNet2DModel, or UNet2DConditionModel + frozen text encoder
    4. train (epsilon prediction, DDPM noise schedule), checkpointing every N steps (the UNet, the
       optimizer, a text model's frozen encoder); resume from the newest checkpoint, only if this same
       recipe (arch, trainer, training set) wrote it
    5. save a standard diffusers folder (DDPMPipeline or IFPipeline layout, safetensors) that
       `memex generate` loads like any other model

Why no DataLoader: the training sets this is for (thousands of 32 px images) fit in memory (as uint8
on the CPU, a batch converted to float on the device), and drawing each step's batch from a generator
seeded by (seed, step, process) makes a resumed run draw exactly the batches the uninterrupted run
would have. Why not accelerate.save_state: it pickles the optimizer and RNG state; memex checkpoints
are safetensors + JSON only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from memex import tiny
from memex.config import ArchConfig, ArchKind, ConfigError, TrainConfig, validate_train
from memex.console import library_logs_to_file
from memex.images import resize
from memex.manifest import ManifestError, expand_duplicates, first_caption, load_image, read_manifest, take_rows
from memex.redact import redact
from memex.storage import RAY_JOB_CONFIG, Store, in_job_working_dir, store_failure

log = logging.getLogger("memex.train")
MANIFEST_FILE = "training_manifest.parquet"  # the exact training set, one row per example
INFO_FILE = "memex_train.json"  # seed, steps, seconds, config
TOKENIZER_CHARS = frozenset(string.printable)  # what memex/tiny.py's character-level tokenizer reads


# 1-2. data ---------------------------------------------------------------------------------
def check_captions_fit(captions: list[str], max_length: int) -> None:
    """Captions that differ only past the tokens arch.max_length keeps would train as one caption (the tiny
    tokenizer reads a character a token: the default 48 keeps ~46 characters, spaces aside; COCO and LAION
    captions run longer). Refused, naming the setting and the length the longest caption needs."""
    import tempfile

    distinct = sorted(set(captions))
    with tempfile.TemporaryDirectory(prefix="memex-tok-") as tmp:
        tok = tiny.build_tokenizer(tmp, max_length=max_length)
        full = tok(distinct, truncation=False).input_ids
    cut: dict[tuple, list[int]] = {}
    for k, ids in enumerate(full):
        cut.setdefault(tuple(ids[:max_length - 1]), []).append(k)
    clash = [g for g in cut.values() if len({tuple(full[k]) for k in g}) > 1]
    if clash:
        a, b = (distinct[k] for k in clash[0][:2])
        raise ManifestError(f"{sum(len(g) for g in clash)} captions differ only past the {max_length - 2} tokens "
                            f"arch.max_length={max_length} keeps, and would train as one (e.g. {a[:80]!r} and "
                            f"{b[:80]!r}): set arch.max_length={max(len(ids) for ids in full)} (the longest caption's "
                            "tokens) or shorten the captions")


SHOWN_PROBLEMS = 10  # rows named in a refused training set's message; all of them go to PROBLEMS_FILE
PROBLEMS_FILE = "_unusable_rows.tsv"  # in output: id <tab> reason, one row a line, when more than that


def _float_lut() -> torch.Tensor:
    """(256,) float32: each uint8 value as training sees it, in [-1, 1]. Computed the way the whole set was
    converted before it was kept as uint8 (float32, / 127.5, - 1), so a batch looked up in it holds the same
    bits on any device (CUDA divides by a scalar through its reciprocal: one ulp off, some values)."""
    return torch.arange(256, dtype=torch.uint8).float() / 127.5 - 1


def to_float(batch: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """A uint8 batch (B, 3, R, R) -> float32 in [-1, 1] on lut's device, with the batch's strides: channels-last
    from load_training_set, the layout the UNet always got (a contiguous one changes its float arithmetic)."""
    return lut[batch.to(lut.device).long()]


def _environment_failure(e: ManifestError) -> bool:
    """A row's error that every row would hit (a store that does not answer, a filesystem package not
    installed): raised at once, not collected row by row (each row would wait on the store again). load_image
    wraps its store error in a ManifestError, and that one again: the whole chain of causes is read."""
    cause = e.__cause__
    while cause is not None:
        if isinstance(cause, ImportError) or store_failure(cause):
            return True
        cause = cause.__cause__
    return False


# the rows load_training_set checks past the first unusable ones: it stops once this many are found (a fault of
# every row, such as another size with data.resize=false, found at row 1 of 5M, was ~10 hours of decoding away)
MAX_PROBLEMS = 1000


@dataclass
class Examples:
    """The training examples, one row each: the expanded manifest's id, source_id and copies columns (its other
    columns, the encoded images among them, are the source rows' and are written by write_training_manifest
    at the end: held here for every copy, 19 MiB of images x 40 copies was 752 MiB for the whole run), and a
    digest of the source manifest's rows as they were read (rows_digest), which that write checks."""

    table: pa.Table
    source_sha256: str

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def _hash_rows(h, rows: list[dict]) -> None:
    """Add manifest rows (Table.to_pylist's dicts) to the hash h: bytes as they are, other values by repr."""
    for row in rows:
        for v in row.values():
            h.update(v if isinstance(v, bytes) else repr(v).encode())
        h.update(b"\x00")


def _schema_text(table: pa.Table) -> bytes:
    return table.schema.to_string(show_field_metadata=True, show_schema_metadata=True,
                                  truncate_metadata=False).encode()


def rows_digest(table: pa.Table) -> str:
    """sha256 of a manifest's schema and rows, 256 rows at a time (load_training_set hashes them so as it
    decodes them)."""
    h = hashlib.sha256(_schema_text(table))
    for start in range(0, len(table), 256):
        _hash_rows(h, table.slice(start, 256).to_pylist())
    return h.hexdigest()


def load_training_set(cfg: TrainConfig, report_to: Path | None = None
                      ) -> tuple[Examples, torch.Tensor, list[str], torch.Tensor, int]:
    """(the training examples (id, source_id, copies: Examples), distinct images (N, 3, R, R) uint8 (a
    channels-last view of one (N, R, R, 3) array, filled as they decode; training converts each batch with
    to_float), their captions, example -> image (the manifest row each example takes), how many of them were
    non-square and squashed to R x R by data.resize).

    Every row is checked before any is refused: one error names how many rows cannot be trained on, the first
    SHOWN_PROBLEMS with their reasons and the fixes; with more, report_to (a folder) gets PROBLEMS_FILE, all
    of them. A missing caption column, one of non-text values, or captions that would train as one
    (check_captions_fit) are refused before any image is decoded."""
    d, r = cfg.data, cfg.arch.resolution
    table = read_manifest(d.path, d.storage_options)
    text = cfg.arch.kind == ArchKind.pixel_text
    col = d.caption_column
    if text and col not in table.column_names:
        raise ManifestError(f"the training manifest {d.path} has no {col!r} column (it has "
                            f"{', '.join(table.column_names)}): a text-conditional model needs captions (set "
                            "data.caption_column, or arch=uncond_small)")
    # several captions an image (COCO): its first, as the audit
    caps = [first_caption(c) for c in table[col].to_pylist()] if col in table.column_names else [None] * len(table)
    ids = table["id"].to_pylist()
    wrong = next((k for k, c in enumerate(caps) if c is not None and not isinstance(c, str)), None)
    if text and wrong is not None:  # a class label (CIFAR's int `label`): a column's type, not a row's problem;
        # label 0 trained as the empty (unconditional) caption, 1 raised a bare TypeError
        cap = caps[wrong]
        raise ConfigError(f"data.caption_column={col!r} holds {type(cap).__name__} values, not caption text "
                          f"(image {ids[wrong]!r}: {str(cap)[:40]}): a text-conditional model trains "
                          "on strings. Point data.caption_column at a column of captions (map class labels to "
                          "their names first), or train arch=uncond_small")
    captions = [c or "" for c in caps]
    # a fault of the captions alone, refused before any image is fetched and decoded (it came after all of them)
    if text:
        check_captions_fit(captions, cfg.arch.max_length)
    digest = hashlib.sha256(_schema_text(table))  # rows_digest(table), computed as the rows are read
    images = np.empty((len(table), r, r, 3), np.uint8)  # the only copy of the pixels, filled in place
    problems: list[tuple[str, str, str]] = []  # (id, reason, kind)
    squashed, k = 0, 0
    for start in range(0, len(table), 256):  # the rows' bytes as Python objects a slice at a time
        if len(problems) >= MAX_PROBLEMS:  # (below: the rest of the slice; here: the slices left, unread)
            break
        rows = table.slice(start, 256).to_pylist()
        _hash_rows(digest, rows)
        for row in rows:
            if len(problems) >= MAX_PROBLEMS:  # a fault of every row (the wrong size): not hours of decoding to say so
                break
            cap = caps[k]
            if text and cap is None:
                problems.append((row["id"], f"image {row['id']!r} has no {col!r}", "caption"))
            unread = sorted(set(cap or "") - TOKENIZER_CHARS) if text else []
            if unread:  # each would become the padding token: "日本の犬" and "猫のロゴ" trained as one caption
                problems.append((row["id"], f"image {row['id']!r}: its caption {cap[:60]!r} has characters the tiny "
                                 f"model's tokenizer does not read ({''.join(unread[:10])!r})", "chars"))
            try:
                img = load_image(row, None, d.storage_options)
            except ManifestError as e:
                if _environment_failure(e):
                    raise
                problems.append((row["id"], str(e), "decode"))
                k += 1
                continue
            if img.shape[:2] != (r, r) and not d.resize:
                problems.append((row["id"], f"image {row['id']!r} is {img.shape[1]}x{img.shape[0]}, the model "
                                 f"takes {r}x{r}", "size"))
            else:
                squashed += img.shape[0] != img.shape[1]
                images[k] = resize(img, r)  # decoded once, resized only when data.resize allows it
            k += 1
    if problems:
        raise ManifestError(_problems_message(cfg, problems, len(table), report_to))
    if report_to is not None:  # a list left by an earlier refused run: these rows are fixed now
        (report_to / PROBLEMS_FILE).unlink(missing_ok=True)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    # the duplication schedule reads the ids alone (and refuses an expanded manifest by its columns): the rows'
    # other columns are not copied per example here (write_training_manifest writes them at the end)
    examples = expand_duplicates(table.select([c for c in ("id", "source_id", "copies") if c in table.column_names]),
                                 d.duplication, d.duplication_seed)
    index = {i: k for k, i in enumerate(ids)}
    example_image = torch.tensor([index[s] for s in examples["source_id"].to_pylist()])
    return Examples(examples, digest.hexdigest()), x, captions, example_image, squashed


WRITE_ROWS, WRITE_BYTES = 4096, 64 << 20  # the most examples, and about the most bytes, written at a time


def write_training_manifest(cfg: TrainConfig, examples: Examples, example_image: torch.Tensor, path: Path) -> None:
    """path: the expanded manifest (expand_duplicates(manifest): every column of each example's source row, its
    own id, source_id and copies), read again from data.path and written WRITE_ROWS examples (about WRITE_BYTES)
    at a time, so the copies' images are never all in memory. A manifest whose rows changed since training read
    them (rows_digest) is refused: the file would not be the training set."""
    d = cfg.data
    table = read_manifest(d.path, d.storage_options)
    if rows_digest(table) != examples.source_sha256:
        raise ManifestError(f"the training manifest {d.path} changed while the model trained (its rows differ from "
                            f"those trained on), so its {MANIFEST_FILE} cannot be written: put back the manifest "
                            "trained on and rerun with the same settings (the run resumes from its last checkpoint "
                            "to save the model), or train again on the new one in another output folder")
    take = example_image.cpu().numpy().astype(np.int64)
    per = max(1, min(WRITE_ROWS, WRITE_BYTES * table.num_rows // max(1, table.nbytes)))
    writer = None
    try:
        for a in range(0, len(take), per):
            idx = take[a:a + per]
            lo = int(idx.min())  # (the rows of a slice of examples: a run of the manifest's, in order)
            part = take_rows(table.slice(lo, int(idx.max()) + 1 - lo), idx - lo)
            ids = examples.table.slice(a, len(idx))
            # as expand_duplicates makes them: id replaced by the copy's, source_id and copies appended
            part = part.set_column(part.column_names.index("id"), "id", ids["id"])
            part = part.append_column("source_id", ids["source_id"]).append_column("copies", ids["copies"])
            if writer is None:
                writer = pq.ParquetWriter(path, part.schema, compression="zstd")
            writer.write_table(part)
    finally:
        if writer is not None:
            writer.close()


# each kind of row problem's fix, named once in the message
FIXES = {"decode": "repair or drop the images that do not decode",
         "size": "set data.resize=true (or arch.resolution) for the images of another size",
         "caption": "give those images captions (a text-conditional model needs them: set data.caption_column, or "
                    "arch=uncond_small)",
         "chars": "transliterate the captions to ASCII (the tokenizer reads printable ASCII and maps others to its "
                  "padding, so captions that differ there train as one)"}


def _problems_message(cfg: TrainConfig, problems: list[tuple[str, str, str]], rows: int,
                      report_to: Path | None) -> str:
    """One refusal for every row that cannot be trained on: the count, the first SHOWN_PROBLEMS, the fixes, and
    where the full list is (report_to/PROBLEMS_FILE, written when more rows than shown are refused)."""
    shown = "; ".join(reason for _, reason, _ in problems[:SHOWN_PROBLEMS])
    more = len(problems) - SHOWN_PROBLEMS
    if more > 0 and report_to is not None:
        listed = report_to / PROBLEMS_FILE
        listed.write_text("id\treason\n" + "".join(f"{i}\t{' '.join(why.split())}\n" for i, why, _ in problems))
        shown += f"; and {more} more (all {len(problems)} listed in {listed})"
    elif more > 0:
        shown += f"; and {more} more"
    fixes = "; ".join(FIXES[kind] for kind in FIXES if any(p[2] == kind for p in problems))
    bad = len({i for i, _, _ in problems})
    checked = "every row was checked" if len(problems) < MAX_PROBLEMS else \
        f"the check stopped at {MAX_PROBLEMS} problems: more rows may have them"
    return (f"{'at least ' if len(problems) >= MAX_PROBLEMS else ''}{bad} of {rows} rows of the training manifest "
            f"{cfg.data.path} cannot be trained on ({len(problems)} problems): {shown}. To train: {fixes}, then "
            f"rerun ({checked})")


def draw_rows(example_image: torch.Tensor, batch: int, g: torch.Generator) -> torch.Tensor:
    """(batch,) distinct-image rows of one step: examples drawn uniformly with replacement from the expanded
    manifest (example -> image), so an image with c copies is drawn c times as often as a single one."""
    return example_image[torch.randint(len(example_image), (batch,), generator=g)]


ENCODE_CHUNK = 1024  # captions through the frozen text encoder at a time


def encode_captions(tokenizer, encoder, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the text encoder's embedding of each distinct caption (U + 1, max_length, hidden) float32 on the CPU, the
    last one the empty caption's (cond_dropout's); image -> its caption's row (N,) int64). Encoded ENCODE_CHUNK
    captions at a time, without gradients. The encoder ran once over one caption an image, all of them at
    once: N x max_length x hidden floats kept, and its activations a few times that at its peak, for a set
    whose images share a few captions (bench/bench_train_memory.py --captions)."""
    row: dict[str, int] = {}
    caption_of = torch.tensor([row.setdefault(c, len(row)) for c in captions], dtype=torch.int64)
    distinct = [*row, ""]
    parts = []
    with torch.no_grad():
        for a in range(0, len(distinct), ENCODE_CHUNK):
            tok = tokenizer(distinct[a:a + ENCODE_CHUNK], padding="max_length", max_length=max_length,
                            truncation=True, return_tensors="pt")
            parts.append(encoder(tok.input_ids)[0])
    return torch.cat(parts), caption_of


# the noise schedule -------------------------------------------------------------------------
MAX_FINAL_SIGNAL = 0.01  # the largest alphas_cumprod at the last timestep accepted: x_T must be ~pure noise


def noise_schedule(timesteps: int):
    """The DDPM schedule memex train trains with and saves in the model (diffusers' linear betas 1e-4..0.02)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=timesteps, variance_type="fixed_small")


def _final_signal(timesteps: int) -> float:
    return float(noise_schedule(timesteps).alphas_cumprod[-1])


def check_schedule_reaches_noise(timesteps: int) -> None:
    """The linear betas run 1e-4..0.02 whatever the number of timesteps, so few of them leave the image in
    x_T (alphas_cumprod[-1]: 0.36 at 100, 0.08 at 250), and sampling, which starts from pure noise, starts
    off the distribution the model learned. Refused, naming the fewest timesteps that reach noise; the
    schedule itself is never changed, so the saved scheduler config is the one trained with."""
    left = _final_signal(timesteps)
    if left <= MAX_FINAL_SIGNAL:
        return
    lo, hi = timesteps + 1, max(timesteps + 1, 1000)
    while _final_signal(hi) > MAX_FINAL_SIGNAL:
        lo, hi = hi + 1, 2 * hi
    while lo < hi:  # the fewest timesteps that do (more of them only lower it)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _final_signal(mid) <= MAX_FINAL_SIGNAL else (mid + 1, hi)
    cfg = noise_schedule(timesteps).config
    raise ConfigError(f"arch.num_train_timesteps={timesteps} leaves {left:.3f} of the image's signal "
                      f"(alphas_cumprod) at the last timestep of the DDPM schedule (linear betas "
                      f"{cfg.beta_start:g}..{cfg.beta_end:g}): x_T is not noise, and sampling, which starts from "
                      f"pure noise, would start off what the model learned. Set arch.num_train_timesteps >= {lo} "
                      f"(the fewest that leave <= {MAX_FINAL_SIGNAL}; 1000 leaves {_final_signal(1000):.0e})")


# 3. model ----------------------------------------------------------------------------------
def build_unet(a: ArchConfig, cross_dim: int | None):
    from diffusers import UNet2DConditionModel, UNet2DModel

    n = len(a.block_out_channels)
    attn = [i >= n - a.attention_levels for i in range(n)]
    common = dict(sample_size=a.resolution, in_channels=3, out_channels=3, layers_per_block=a.layers_per_block,
                  block_out_channels=tuple(a.block_out_channels), norm_num_groups=8)
    if a.kind == ArchKind.unconditional:
        down = tuple("AttnDownBlock2D" if at else "DownBlock2D" for at in attn)
        return UNet2DModel(down_block_types=down,
                           up_block_types=tuple(reversed([b.replace("Down", "Up") for b in down])), **common)
    down = tuple("CrossAttnDownBlock2D" if at else "DownBlock2D" for at in attn)
    return UNet2DConditionModel(down_block_types=down,
                                up_block_types=tuple(reversed([b.replace("Down", "Up") for b in down])),
                                cross_attention_dim=cross_dim, attention_head_dim=8, **common)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    t = cfg.trainer
    return t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps))  # linear warm-up, then constant


# 4. checkpoints: safetensors + JSON, never pickle -----------------------------------------
# trainer keys a resumed run may change: how long, how often it checkpoints and logs. Everything
# else (arch, lr, seed, precision, the decoded training set) must match the checkpoint's.
RESUME_SAFE = ("steps", "checkpoint_every", "keep_checkpoints", "log_every")


HASH_CHUNK_BYTES = 32 << 20  # float32 bytes of the training set converted at a time to be hashed


def _hashed_chunk(part: torch.Tensor) -> np.ndarray:
    """Rows of the training set as recipe() hashes them: float32 (n, 3, R, R) in [-1, 1], C order. uint8: the
    whole set's conversion of before (_float_lut's values), on these rows, in place."""
    part = part.detach().cpu().contiguous()  # C order: the float made from it is, with no second copy
    return (part.float().div_(127.5).sub_(1) if part.dtype == torch.uint8 else part.float()).numpy()


def recipe(cfg: TrainConfig, images: torch.Tensor, captions: list[str], example_image: torch.Tensor,
           processes: int = 1) -> dict:
    """What a checkpoint's weights depend on, written into it and compared when training resumes:
    the arch, the trainer less RESUME_SAFE, and a digest of the training set as decoded (pixels,
    captions, example -> image: the manifest, data.resize and the duplication schedule all land
    there; data.path and its credentials do not, so a copied manifest resumes).

    The pixels are hashed as the float32 (N, 3, R, R) C-order bytes training sees (to_float's values),
    the digest of before, when the whole set was held as float: converted HASH_CHUNK_BYTES at a time from
    the uint8 images load_training_set keeps, so no float copy of the set is made (it was a transient one
    the size of the float set, beside the float set itself: bench/bench_train_memory.py). A float tensor
    (N, 3, R, R) in [-1, 1] is hashed the same way, a chunk at a time. (The in-place division is the same
    float32 operation as the out-of-place one of before: bit for bit, on the CPU.)"""
    from dataclasses import asdict

    plain = json.loads(json.dumps(asdict(cfg), default=lambda v: getattr(v, "value", str(v))))
    h = hashlib.sha256()
    per = max(1, HASH_CHUNK_BYTES // max(1, 4 * images[0].numel())) if len(images) else 1
    for a in range(0, len(images), per):  # (one chunk's float alive at a time: each freed after its update)
        h.update(memoryview(_hashed_chunk(images[a:a + per])).cast("B"))
    # default=repr: an unconditional model's captions that are no JSON (a binary column: bytes) raised a bare
    # TypeError; a digest of captions that are JSON is the same as before
    h.update(json.dumps(captions, default=repr).encode())
    h.update(example_image.cpu().numpy().astype(np.int64).tobytes())
    out = {"arch": plain["arch"], "trainer": {k: v for k, v in plain["trainer"].items() if k not in RESUME_SAFE},
           "training_set_sha256": h.hexdigest()}
    if processes > 1:  # accelerate launch --num_processes N: N x trainer.batch_size examples a step, other
        out["processes"] = processes  # draws (left out at 1, so checkpoints of before still resume)
    return out


def _recipe_differences(saved: dict, now: dict) -> list[str]:
    """Keys whose values differ between a checkpoint's recipe and this run's ("arch.resolution")."""
    out = []
    for section in ("arch", "trainer"):
        a, b = saved.get(section, {}), now[section]
        out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if saved.get("processes", 1) != now.get("processes", 1):
        out.append(f"the number of training processes (accelerate launch --num_processes: was "
                   f"{saved.get('processes', 1)}, now {now.get('processes', 1)}; each draws its own batch)")
    if saved.get("training_set_sha256") != now["training_set_sha256"]:
        out.append("the training set (data.path's images or captions, data.duplication, data.duplication_seed, "
                   "data.resize)")
    return out


def _save_checkpoint(folder: Path, step: int, unet, opt: torch.optim.Optimizer, keep: int, made_by: dict,
                     scaler=None, encoder=None) -> None:
    """checkpoint-<step>/: the UNet, the optimizer's tensors (safetensors) and the rest as JSON: its param
    groups, the step, the recipe, and fp16's loss scale (accelerate's GradScaler: scale, growth tracker).
    Without the scale a resumed fp16 run restarted at 65,536 and skipped steps until it backed off to where
    the uninterrupted run was (each skip an overflow: a step with no update). A text model's frozen encoder
    too (text_encoder/, ~1 MB at the tiny sizes): a resume rebuilt it from trainer.seed, and a torch or
    transformers version that initialises it otherwise would have changed every caption's conditioning."""
    from safetensors.torch import save_file

    tmp = folder / f"_tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    if encoder is not None:
        encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    save_file(tensors, tmp / "optimizer.safetensors")
    scale = scaler.state_dict() if scaler is not None else {}  # {} also before its first step
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "step": step,
                                                    "recipe": made_by, **({"grad_scaler": scale} if scale else {})}))
    tmp.rename(folder / f"checkpoint-{step}")  # complete only once renamed
    for old in checkpoints(folder)[:-keep]:
        # out of checkpoints() first, by one rename: a run killed while rmtree deleted its files left a
        # checkpoint-N with some of them, which the resume took for complete (the newest, after a save failed)
        gone = folder / f"_tmp-{old.name}"
        shutil.rmtree(gone, ignore_errors=True)
        old.rename(gone)
        shutil.rmtree(gone)
    # a save killed at another step left its full-size _tmp- folder (a UNet and its optimizer state each),
    # which no later save of this run removed (or a prune killed mid-delete, its _tmp-checkpoint-N): one
    # process saves (rank 0), and train holds output's lease, so none is being written now
    for stale in folder.glob("_tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoint-<step> folders, oldest first (a `_tmp-` one is still being written)."""
    steps = {p: p.name.split("-", 1)[1] for p in folder.glob("checkpoint-*")}
    # a name that is no step (checkpoint-3.bak, a copy by hand) is not one of them: it crashed the sort
    return sorted((p for p, s in steps.items() if s.isdigit() and p.is_dir()), key=lambda p: int(steps[p]))


def latest_checkpoint(folder: Path) -> Path | None:
    done = checkpoints(folder)
    return done[-1] if done else None


def check_resumable(path: Path, made_by: dict, steps: int) -> None:
    """Resume only from a checkpoint this same recipe wrote; anything else is refused before anything
    is written (another arch fails to load anyway; another lr, seed or training set would load and
    silently continue a different run, and the saved memex_train.json would describe neither)."""
    try:
        meta = json.loads((path / "optimizer.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ConfigError(_damaged_checkpoint(path, e)) from e
    out = path.parent.parent
    if "recipe" not in meta:
        raise ConfigError(f"{path} has no recipe (written before memex recorded one), so resuming from it could "
                          f"continue a different training run: delete {out / 'checkpoints'} to start over, or "
                          "choose another output folder")
    differ = _recipe_differences(meta["recipe"], made_by)
    if differ:
        raise ConfigError(f"output={out} holds checkpoints of another training run ({path.name}): "
                          f"{', '.join(differ)} differ from this one's. Choose another output folder, or delete "
                          f"{out / 'checkpoints'} to start over")
    if meta["step"] > steps:
        raise ConfigError(f"{path.name} is past trainer.steps={steps}: set trainer.steps >= {meta['step']} to "
                          "resume it, or choose another output folder")


def _damaged_checkpoint(path: Path, e: Exception) -> str:
    """Checkpoints are renamed into place whole (_save_checkpoint), so one that does not load was
    changed afterwards (a partial copy, a full disk on another machine): name it and the way out."""
    older = [p.name for p in checkpoints(path.parent) if p != path]
    back = f"resume from {older[-1]}" if older else "start over"
    return (f"{path} is damaged or incomplete ({type(e).__name__}: {str(e)[:300]}). Delete that folder and rerun "
            f"to {back}, or choose another output folder")


def _not_written_here(out: Path) -> str:
    """output holds a diffusers folder (model_index.json) and no memex_train.json: a model memex train did
    not write (a downloaded one, a typo), which training would overwrite."""
    return (f"output={out} holds a diffusers model (model_index.json) that memex train did not write (it has no "
            f"{INFO_FILE}): training would overwrite its unet/, scheduler/ and model_index.json. Choose another "
            "output folder (a memex train run killed while saving its model here finishes when rerun with the "
            "same settings)")


def _finished_here(ck: Path | None, made_by: dict | None, steps: int) -> bool:
    """Whether ck is a checkpoint at `steps` written by the recipe made_by (None: the recipe is not known
    yet, the step alone is checked): the mark of a run killed while saving its model, which may finish."""
    if ck is None or int(ck.name.split("-", 1)[1]) != steps:  # (checkpoints(): only checkpoint-<digits>)
        return False
    if made_by is None:
        return True
    try:
        saved = json.loads((ck / "optimizer.json").read_text())["recipe"]
    except (OSError, ValueError, KeyError, TypeError):  # damaged, or no recipe: not known to be this run's
        return False
    return not _recipe_differences(saved, made_by)


def _load_text_encoder(path: Path, encoder) -> None:
    """The frozen text encoder a checkpoint's UNet trained with (its text_encoder/), into encoder."""
    try:
        encoder.load_state_dict(type(encoder).from_pretrained(path / "text_encoder").state_dict())
    except Exception as e:  # noqa: BLE001 - a truncated safetensors, a missing config.json: named with the fix
        raise ConfigError(_damaged_checkpoint(path, e)) from e


def _load_checkpoint(path: Path, unet, opt: torch.optim.Optimizer, scaler=None) -> int:
    """Load checkpoint-<step>/ into unet, opt and (fp16) the GradScaler; returns its step. A checkpoint of
    an fp32 run (or written before the scale was kept) leaves the scaler as it starts."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "optimizer.json").read_text())
        cls = UNet2DModel if isinstance(unet, UNet2DModel) else UNet2DConditionModel
        unet.load_state_dict(cls.from_pretrained(path / "unet").state_dict())
        state: dict[int, dict] = {}
        for key, v in load_file(path / "optimizer.safetensors").items():
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if scaler is not None and meta.get("grad_scaler"):
            scaler.load_state_dict(meta["grad_scaler"])
    except Exception as e:  # noqa: BLE001 - any failure to load it: re-raised naming the checkpoint and the fix
        raise ConfigError(_damaged_checkpoint(path, e)) from e
    return int(meta["step"])


# the whole job -----------------------------------------------------------------------------
# each step's batch generator is seeded with trainer.seed x SEED_STRIDE + step x STEP_STRIDE + process index
SEED_STRIDE, STEP_STRIDE = 1_000_003, 101
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


def _step_seed(seed: int, step: int, process: int) -> int:
    return seed * SEED_STRIDE + step * STEP_STRIDE + process


def seed_range(steps: int, processes: int = 1) -> tuple[int, int]:
    """The trainer.seed values whose every step's generator seed (_step_seed) torch takes."""
    return -(-SEED_MIN // SEED_STRIDE), (SEED_MAX - _step_seed(0, steps - 1, processes - 1)) // SEED_STRIDE


def check_run_inputs(cfg: TrainConfig, device: str, processes: int, copies_a_recipe: bool = False) -> TrainConfig:
    """Checks of the settings against the machine the run trains on, before output is touched or any image is
    decoded (validate_train checks the values alone). Returns cfg, changed only for copies_a_recipe (below).

    * trainer.seed: each step's batch generator is seeded with seed x 1,000,003 + step x 101 + process, which
      torch takes as a 64-bit integer; a seed past ~1.8e13 (a nanosecond timestamp) overflowed it with a
      traceback at step 0, after every image was decoded. Refused, naming the range.
    * trainer.mixed_precision=fp16 on the CPU: accelerate runs no fp16 there (no autocast, no GradScaler), so the
      run trained in float32 while its recipe and memex_train.json said fp16. Refused, naming bf16 and no.
      copies_a_recipe (LiRA's shadows, trained with the target's recipe: train's copies_recipe=True): the
      target trained fp16 on a GPU, and the shadow on a CPU worker trains in float32, as it did before,
      recorded as trainer.mixed_precision=no, with a warning."""
    from dataclasses import replace

    t = cfg.trainer
    lo, hi = seed_range(t.steps, processes)
    if not lo <= t.seed <= hi:
        raise ConfigError(f"trainer.seed={t.seed} is outside {lo}..{hi}: each training step draws its batch from a "
                          f"torch generator seeded with trainer.seed x {SEED_STRIDE:,} + step x {STEP_STRIDE} + "
                          f"process, a 64-bit integer this seed overflows (at trainer.steps={t.steps}). Give a seed "
                          "in that range (a timestamp in seconds fits; one in nanoseconds does not)")
    if t.mixed_precision == "fp16" and device == "cpu":
        if copies_a_recipe:
            log.warning("trainer.mixed_precision=fp16 (the copied recipe's) on the CPU: accelerate runs no fp16 "
                        "there; training in float32 (trainer.mixed_precision=no), as before")
            return replace(cfg, trainer=replace(t, mixed_precision="no"))
        raise ConfigError("trainer.mixed_precision=fp16 on the CPU: accelerate runs no fp16 there (no autocast, no "
                          "loss scaling), so the run would train in float32 and record fp16. Set "
                          "trainer.mixed_precision=bf16 (on a CPU that has it) or trainer.mixed_precision=no, or "
                          "train on a GPU")
    return cfg


def _in_use(out: Path, store) -> str:
    from memex.config import StorageConfig
    from memex.lease import LEASE_NAME, live_holder

    who = live_holder(store, StorageConfig(), f"output={out}") or "another process (it just let go: rerun)"
    return (f"output={out} is in use by {who}: another memex train writes its checkpoints and model there (a "
            "requeued or twice-launched job), and two runs in one folder delete each other's checkpoints. Wait for "
            "it to finish, or choose another output folder. If that process is gone, its lease is taken over "
            f"{StorageConfig().lease_timeout_s:g} s after its last heartbeat, at once on its own machine; to take "
            f"over now, delete {out / LEASE_NAME}")


# how long a run waits for the output's lease: a requeued job's predecessor, killed on another node, holds it
# until its heartbeat is storage's lease_timeout_s (300 s) old, and the requeued job then resumes, as before
# the lease; a second live run is refused after it
OUTPUT_LEASE_WAIT_S = 360.0


@contextlib.contextmanager
def _output_lease(out: Path, state) -> Iterator[None]:
    """output/_lease.json (memex/lease.py, storage's default timeout) for the whole run, so a second run
    into the same output refuses, naming the first, instead of deleting its checkpoints (_save_checkpoint's
    prune and stale-folder cleanup). `accelerate launch`: the main process holds it, and every process stops
    if it could not take it."""
    from accelerate.utils import broadcast_object_list

    from memex.config import StorageConfig
    from memex.lease import LeaseHeld, hold

    store = Store(str(out.absolute()))
    with contextlib.ExitStack() as stack:
        err: BaseException | None = None
        if state.is_main_process:
            try:
                # a requeued job on another node finds its killed predecessor's lease: it waits for it to go
                # stale (no heartbeat for lease_timeout_s) and resumes, as before the lease; a live run is refused
                stack.enter_context(hold(store, StorageConfig(), f"output={out}", wait_s=OUTPUT_LEASE_WAIT_S))
            except LeaseHeld:
                err = ConfigError(_in_use(out, store))
            except Exception as e:  # noqa: BLE001 - told to the other processes first (they would wait for it)
                err = e
        if state.num_processes > 1:
            told = broadcast_object_list([None if err is None else str(err)])[0]
            if told is not None and err is None:
                err = ConfigError(f"the main training process did not take output={out}: {told}")
        if err is not None:
            raise err
        yield


def train(cfg: TrainConfig, cpu: bool = False, copies_recipe: bool = False) -> Path:
    """Train and save a diffusers folder at cfg.output; returns its path. Resumes if interrupted.
    cpu: on the CPU though a GPU is visible (a Ray worker given none: memex/models.py resolve_device).
    copies_recipe: a LiRA shadow of memex mia, which must copy its target's recipe as it was trained: no
    refusal of a noise schedule too short to reach noise (check_schedule_reaches_noise), and on a CPU a
    target's fp16 recipe is trained in float32 (check_run_inputs).
    The whole run holds output's lease (_output_lease): a second run into the same folder is refused."""
    library_logs_to_file()  # importing IFPipeline warns on transformers 5: to the log file, not the console
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # 1. check inputs before any training
    validate_train(cfg)
    # under `ray job submit --working-dir .` a relative output (README's output=models/logos) is saved into Ray's
    # copy of the working dir, which Ray deletes once the job is done: the model was lost with exit 0
    why = in_job_working_dir(cfg.output, "output", os.environ.get(RAY_JOB_CONFIG), os.getcwd())
    if why:
        raise ConfigError(why)
    # the device and processes accelerate trains with (Accelerator reads ACCELERATE_USE_CPU, then this state)
    state = PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    cfg = check_run_inputs(cfg, state.device.type, state.num_processes, copies_a_recipe=copies_recipe)
    if not copies_recipe:  # (off for LiRA's shadows: they copy a target's recipe, trained before the check existed)
        check_schedule_reaches_noise(cfg.arch.num_train_timesteps)
    out = Path(cfg.output)
    # an unwritable output fails in one line before the data is decoded, not in a traceback after it;
    # the folders made here are removed again if the input checks below fail
    new = [p for p in (out.absolute(), *out.absolute().parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output={out} cannot be created ({type(e).__name__}: {e.strerror or e}): give a "
                          "writable folder") from e
    try:
        with _output_lease(out, state):
            return _train_here(cfg, cpu, out, new)
    except BaseException:
        for p in new:  # deepest first; a folder something else wrote into stays (the lease is let go by now)
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def _train_here(cfg: TrainConfig, cpu: bool, out: Path, new: list[Path]) -> Path:
    """train, in output (made, its lease held); `new`: the folders made for it, removed by train if an input
    check fails."""
    from accelerate import Accelerator
    from diffusers import DDPMPipeline, IFPipeline

    a, t = cfg.arch, cfg.trainer
    noise_sched = noise_schedule(a.num_train_timesteps)
    # a diffusers folder memex train did not write (no memex_train.json) is refused too, unless a checkpoint at
    # trainer.steps of this recipe (checked once the data is decoded) says a run was killed while saving it here
    unfinished = (out / "model_index.json").exists()
    if unfinished and (out / INFO_FILE).exists():
        raise ConfigError(f"output={out} already holds a trained model; choose another output folder")
    if unfinished and not _finished_here(latest_checkpoint(out / "checkpoints"), None, t.steps):
        raise ConfigError(_not_written_here(out))
    examples, images, captions, example_image, squashed = load_training_set(cfg, report_to=out)
    accel = Accelerator(mixed_precision=t.mixed_precision, cpu=cpu)
    # a checkpoint left in output/checkpoints is resumed only if this same recipe wrote it
    made_by = recipe(cfg, images, captions, example_image, accel.num_processes)
    ck = latest_checkpoint(out / "checkpoints")
    if unfinished and not _finished_here(ck, made_by, t.steps):
        raise ConfigError(_not_written_here(out))
    if ck is not None:
        check_resumable(ck, made_by, t.steps)
    new.clear()  # the input checks passed: what was made for output stays, as before, whatever fails next

    torch.manual_seed(t.seed)

    # 3. model (+ frozen text encoder: embeddings computed once per distinct caption)
    tokenizer = encoder = emb = empty = caption_of = None
    try:
        if a.kind == ArchKind.pixel_text:
            tokenizer = tiny.build_tokenizer(out / "_tokenizer", max_length=a.max_length)
            encoder = tiny.build_text_encoder(len(tokenizer), a.max_length, hidden=a.text_hidden, seed=t.seed,
                                              layers=a.text_layers)
            if ck is not None and (ck / "text_encoder").is_dir():  # the encoder the checkpoint's UNet trained with
                _load_text_encoder(ck, encoder)
            emb, caption_of = encode_captions(tokenizer, encoder, captions, a.max_length)
            empty = emb[-1:].to(accel.device)
        unet = build_unet(a, a.text_hidden if a.kind == ArchKind.pixel_text else None)
        opt = torch.optim.AdamW(unet.parameters(), lr=t.lr, weight_decay=0.0)
        start = 0
        if ck is not None:
            start = _load_checkpoint(ck, unet, opt, accel.scaler)  # (accel.scaler: fp16's GradScaler, else None)
            log.info("resuming from %s (step %d)", ck, start)
    except BaseException:  # a damaged checkpoint: refused with nothing of this run's left behind
        shutil.rmtree(out / "_tokenizer", ignore_errors=True)
        raise
    ckpts = out / "checkpoints"
    unet, opt = accel.prepare(unet, opt)
    lut = _float_lut().to(accel.device)  # images stay uint8 on the CPU: a batch goes to the device, float there
    log.info("training %s: %d examples (%d distinct images), %.2fM params, steps %d..%d", a.kind.value,
             examples.num_rows, len(images), sum(p.numel() for p in unet.parameters()) / 1e6, start, t.steps)

    # 4. train
    t0 = time.perf_counter()
    unet.train()
    for step in range(start, t.steps):
        g = torch.Generator().manual_seed(_step_seed(t.seed, step, accel.process_index))
        rows = draw_rows(example_image, t.batch_size, g)
        x0 = to_float(images[rows], lut)
        noise = torch.randn(x0.shape, generator=g).to(accel.device)
        ts = torch.randint(0, a.num_train_timesteps, (t.batch_size,), generator=g).to(accel.device)
        xt = noise_sched.add_noise(x0, noise, ts)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        with accel.autocast():
            if emb is None:
                pred = unet(xt, ts).sample
            else:
                cond = emb[caption_of[rows]].to(accel.device)  # (a batch's: emb stays on the CPU)
                cond[(torch.rand(t.batch_size, generator=g) < t.cond_dropout).to(accel.device)] = empty
                pred = unet(xt, ts, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred.float(), noise)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss is {loss.item()} at step {step}; lower trainer.lr (now {t.lr})")
        opt.zero_grad(set_to_none=True)
        accel.backward(loss)
        opt.step()
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            log.info("step %d/%d loss %.4f (%.2f s/step)", done, t.steps, loss.item(),
                     (time.perf_counter() - t0) / (done - start))
        if accel.is_main_process and (done % t.checkpoint_every == 0 or done == t.steps):
            _save_checkpoint(ckpts, done, accel.unwrap_model(unet), opt, t.keep_checkpoints, made_by, accel.scaler,
                             encoder)
    seconds = time.perf_counter() - t0

    # 5. save the diffusers folder, the exact training set and how it was made
    if accel.is_main_process:
        unet = accel.unwrap_model(unet).eval()
        if a.kind == ArchKind.unconditional:
            pipe = DDPMPipeline(unet=unet, scheduler=noise_sched)
        else:
            pipe = IFPipeline(tokenizer=tokenizer, text_encoder=encoder, unet=unet, scheduler=noise_sched,
                              safety_checker=None, feature_extractor=None, watermarker=None,
                              requires_safety_checker=False)
        # the manifest first (atomically), the pipeline next (model_index.json its last file), memex_train.json
        # last and atomically: a run killed in between leaves no folder that loads without its manifest, and
        # no truncated memex_train.json that made every rerun refuse ("already holds a trained model")
        tmp = out / f"_tmp-{MANIFEST_FILE}"
        write_training_manifest(cfg, examples, example_image, tmp)
        tmp.replace(out / MANIFEST_FILE)
        pipe.save_pretrained(out, safe_serialization=True)
        from dataclasses import asdict

        info = {"steps": t.steps, "resumed_from": start, "train_seconds_this_run": round(seconds, 1),
                "seed": t.seed, "examples": examples.num_rows, "distinct_images": len(images),
                # non-square images squashed to the square resolution: an audit must compare with them
                # squashed too (trainset.preprocess=resize; memex/stages/audit.py refuses another)
                "squashed_images": int(squashed),
                "processes": accel.num_processes,  # each drew trainer.batch_size examples a step
                # data.storage_options' credentials redacted: memex/redact.py
                "config": redact(json.loads(json.dumps(asdict(cfg), default=lambda v: getattr(v, "value", str(v)))))}
        tmp = out / f"_tmp-{INFO_FILE}"
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(out / INFO_FILE)
        shutil.rmtree(out / "_tokenizer", ignore_errors=True)
    # `accelerate launch --num_processes N`: the other processes returned at once and said "model saved" before
    # the main one had written it; they wait for it now (one process: no-op)
    accel.wait_for_everyone()
    return out
