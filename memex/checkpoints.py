"""Find the checkpoints under a location, and hash what an audit of each would load.

These layouts are recognised, at any depth up to MAX_DEPTH below the location:

    <dir>/model_index.json              a diffusers pipeline folder: one checkpoint
    <run>/checkpoint-<step>/unet/       a training output (diffusers' train_text_to_image, memex
                                        train's checkpoints/): a fine-tuned UNet only, audited on
                                        top of a base pipeline; with text_encoder/ beside it
                                        (DreamBooth's --train_text_encoder), both replace the base's;
                                        `ema`: its unet_ema/ (train_text_to_image --use_ema) instead
    <run>/checkpoint-<step>/pytorch_lora_weights.safetensors
                                        a LoRA training output (diffusers' *_lora.py scripts):
                                        audited as model.lora on the base (memex/lora.py)
    <run>/pytorch_lora_weights.safetensors   the final LoRA of those scripts (no step)
    <run>/checkpoint-<step>-<suffix>/   a user's export of a step's other weights (checkpoint-1000-ema/, a
                                        pipeline or unet/): its step, a series of its own (<run>/<run>-<suffix>)
    <dir>/<name>-<step>.safetensors     kohya's LoRA files (sd-scripts' train_network.py), told
                                        from other weights by their header; a series per <name>,
                                        its step the metadata's ss_steps; --save_state folders
                                        (accelerate's state) are no checkpoints

The base of a checkpoint-<step> folder is `base` when given (the model the run fine-tunes), else
the nearest enclosing diffusers folder (memex train writes its pipeline beside checkpoints/),
else discovery fails naming the missing setting. A `memex train` run still training (checkpoints,
no pipeline yet) is left out with a warning until it saves its pipeline, and its last
checkpoint-<steps>/ is left out after: the pipeline holds the same weights (nightly's plan does the like for
other trainers' final models, keeping the checkpoint: once_per_model). Folders whose name
starts with `_` or `.` are skipped (memex writes `_tmp-...` first and renames when complete), as is a checkpoint whose
newest file is younger than `settle_s` (a trainer may still be writing it), and, with a warning,
a folder this user cannot read or one deleted while walked (a checkpoint-<step>/ alone, not its run).

Why local paths only: loading a pipeline needs its files on a local disk anyway; nightly hosts
mount the training bucket (s3fs-fuse, FSx, GCS FUSE) or sync it first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from memex.config import MemexError
from memex.lora import LORA_FILE
from memex.models import (
    HUB_ID,
    SINGLE_FILE_SUFFIXES,
    WEIGHT_SUFFIXES,
    ModelError,
    _safetensors_header,
    cached_snapshot,
    check_hub_model,
    check_local_checkpoint,
    check_sampled_pipeline,
    loaded_weight_files,
    safetensors_metadata,
    weights_file_kind,
)

MAX_DEPTH = 4
PICKLED_LORA = "pytorch_lora_weights.bin"  # diffusers' LoRA file saved with safe_serialization=False
CKPT_DIR = re.compile(r"^checkpoint-(\d+)$")
# checkpoint-<step>-<suffix>/: a user's export of one step's other weights (checkpoint-1000-ema: its EMA UNet).
# Its step is the name's, its series its own, <run>/<run>-<suffix>: EMA (or pruned, fp16) weights are another
# model than the raw checkpoint of that step; read as the series' step-less final model, checkpoint-1000-ema was
# gated against checkpoint-2000 (a "grew" between two kinds of weights), and in the raw series at its step it
# would sit beside the raw checkpoint-1000, each gated against the other kind (why nightly.ema is a config of
# its own). A series per suffix compares like with like, in step order.
CKPT_SUFFIXED = re.compile(r"^checkpoint-(\d+)-([A-Za-z][\w.-]*)$")
TRAILING_STEP = re.compile(r"(?:^|[-_])(?:step-?)?(\d+)$")
# sd-scripts' own save names: <output_name>-<epoch:06d> and <output_name>-step<step:08d> (and <output_name> last)
KOHYA_SAVE = re.compile(r"-(?:step(\d{8})|(\d{6}))$")
log = logging.getLogger("memex.checkpoints")
HASH_CHUNK = 8 << 20  # 8 MiB reads: sha256 runs at ~1 GB/s, a 3.4 GB SD UNet hashes in ~4 s


class CheckpointError(MemexError, ValueError):
    """The checkpoint location is missing or holds something memex cannot audit."""


@dataclass(frozen=True)
class Checkpoint:
    location: str  # the folder found: a pipeline folder or a checkpoint-<step> folder
    series: str  # the training run it belongs to: growth is measured against the previous step in it
    step: int | None
    base: str  # the pipeline folder (or hub id) to load
    unet: str | None  # checkpoint-<step>/unet that replaces the base's UNet, or None
    lora: str | None = None  # checkpoint-<step>/pytorch_lora_weights.safetensors fused into the base, or None
    text_encoder: str | None = None  # checkpoint-<step>/text_encoder (DreamBooth --train_text_encoder), or None

    @property
    def name(self) -> str:
        """A short, folder-safe name: <series folder>-<step or folder name>."""
        tail = f"step{self.step}" if self.step is not None else Path(self.location).name
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(self.series).name}-{tail}")[:80]


def _memex_train_checkpoint(ckpt: Path) -> bool:
    """checkpoint-<step>/ written by `memex train` (memex/training.py _save_checkpoint): its optimizer.json
    holds the recipe. Unreadable or other JSON: not one."""
    try:
        return "recipe" in json.loads((ckpt / "optimizer.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _step_of_folder(path: Path) -> int | None:
    """A pipeline or final LoRA folder's training step: memex_train.json's; none for a training output
    that holds its own checkpoint-<step>/ folders (the final model: not compared for growth), whose
    name, `sd15-lora-512` or `lora_out_2`, is no step (it gave the final model step 512 or 2: out of
    order in its series, gated against the wrong checkpoint, logged at that step); else the number its
    name ends with (exports side by side: step-1000/, step-2000/)."""
    if m := CKPT_DIR.match(path.name) or CKPT_SUFFIXED.match(path.name):  # a whole pipeline saved as checkpoint-<step>/
        return int(m.group(1))
    info = path / "memex_train.json"
    if info.is_file():
        try:
            return int(json.loads(info.read_text())["steps"])
        except (ValueError, KeyError, TypeError):
            pass
    if any(CKPT_DIR.match(p.name) and p.is_dir()
           for p in [*path.iterdir(), *(path / "checkpoints").glob("checkpoint-*")]):
        return None
    m = TRAILING_STEP.search(path.name)
    return int(m.group(1)) if m else None


def _kohya_series(f: Path) -> tuple[str, int | None]:
    """A LoRA file's (series name, training step). sd-scripts writes its run's name (ss_output_name) and the
    global step (ss_steps) into the file's metadata: two runs whose names end in a number (sd15_lora_512,
    sd15_lora_768) are two series, and an epoch save's number (<name>-000003) is not taken for a step. A
    file without them (--no_metadata, other trainers: mylora-500, ai-toolkit's mylora_000000500) is named by
    its stem less its trailing number (sd-scripts' -000003 / -step00001000 first), which is its step."""
    try:
        meta = safetensors_metadata(str(f)) or {}
    except (ModelError, OSError):
        meta = {}
    m = KOHYA_SAVE.search(f.stem) or TRAILING_STEP.search(f.stem)
    number = int(next(g for g in m.groups() if g)) if m else None
    name = meta.get("ss_output_name") or (f.stem[:m.start()] if m and m.start() else f.stem)
    try:
        step = int(meta["ss_steps"])
    except (KeyError, ValueError, TypeError):
        step = number
    return name, step


def _newest_mtime(path: Path) -> float:
    """The newest mtime of the files under `path`; a file deleted while listed (a trainer rotating
    its checkpoints) is skipped, and a gone `path` counts as just written (not settled: left alone)."""
    newest = None
    for f in path.rglob("*"):
        try:
            if f.is_file():
                newest = max(newest or 0.0, f.stat().st_mtime)
        except FileNotFoundError:
            continue
    if newest is not None:
        return newest
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _is_training_state(d: Path) -> bool:
    """accelerate's save_state folder (kohya's --save_state: <name>-000001-state/): the network's
    weights as model.safetensors beside the optimizer and RNG states. Not a checkpoint to audit: the
    same epoch's <name>-000001.safetensors is, and its state was audited as a second LoRA."""
    return (d / "optimizer.bin").is_file() or any(d.glob("random_states_*.pkl"))


def check_base_model(base: str) -> None:
    """nightly.base_model: a local diffusers pipeline folder (checked now), or a hub id (asked of the
    hub when not cached here, models.check_hub_model; its weights are checked when loaded). A wrong
    path used to surface as one failed audit per checkpoint, each naming model.path, and as error
    rows in the ledger; a base memex cannot sample (SDXL) the same way."""
    if Path(base).exists() or not HUB_ID.match(base):
        check_sampled_pipeline(base, base, check_local_checkpoint(base, "nightly.base_model"), "nightly.base_model")
    elif cached_snapshot(base) is None:
        check_hub_model(base, "nightly.base_model")


def discover(location: str, base: str | None = None, settle_s: float = 0.0, ema: bool = False) -> list[Checkpoint]:
    """Every checkpoint under `location`, sorted by (series, step, location).

    `ema` (nightly.ema): a checkpoint-<step>/ is audited with its unet_ema/, the exponential moving
    average diffusers' train_text_to_image --use_ema saves beside unet/. The run's final pipeline
    holds those weights, so an EMA run's series compares like with like; unet/ holds the raw weights
    training resumes from. A run whose checkpoint-<step>/ hold unet/ and no unet_ema/ then fails discovery, naming
    one; where the run's other checkpoints hold unet_ema/, those without are left out with a warning."""
    root = Path(location)
    if "://" in location:
        raise CheckpointError(f"nightly.location={location}: checkpoints must be on a local or mounted path "
                              "(mount the bucket or sync it first; runs and the ledger can still go to storage.root)")
    if not root.is_dir():
        what = "a file, not the folder holding the checkpoints" if root.exists() else "no such folder"
        raise CheckpointError(f"nightly.location={location}: {what}")
    if base is not None:
        check_base_model(base)
    found: list[Checkpoint] = []
    now = time.time()

    pending: list[Path] = []  # checkpoints still being written (newer than settle_s)
    raw_only: list[tuple[str, Path]] = []  # ema: (series, checkpoint-<step>/) holding unet/ with no unet_ema/ beside it
    ema_series: set[str] = set()  # ema: the series with a checkpoint holding unet_ema/
    ema_unused: list[Path] = []  # not ema: checkpoints whose unet_ema/ is left unaudited
    lycoris: list[Path] = []  # LoHa/LoKr files: not LoRAs diffusers loads (memex/lora.py)
    training: list[Path] = []  # memex train checkpoints of a run still training (no pipeline saved yet)
    pickled: list[Path] = []  # pytorch_lora_weights.bin: a LoRA series memex does not read (pickle)
    vanished: list[Path] = []  # folders deleted while walked (a trainer's checkpoint rotation)
    too_deep: list[Path] = []  # folders below MAX_DEPTH: not searched (a whole bucket's tree would be)
    side_by_side: list[int] = []  # found[i]: exported pipelines side by side, a series per parent (see below)

    def settled(p: Path) -> bool:
        if settle_s <= 0 or now - _newest_mtime(p) >= settle_s:
            return True
        pending.append(p)
        return False

    def walk(d: Path, depth: int, enclosing_pipeline: Path | None) -> None:
        try:
            visit(d, depth, enclosing_pipeline)
        except PermissionError as e:  # lost+found at a volume's root, another user's run: the rest is audited
            if depth == 0:  # the location itself: skipped, every night "found 0 checkpoints" and exited 0
                raise CheckpointError(f"nightly.location={location}: not readable by this user ({e}): run the "
                                      "nightly as a user who can list it, or give it read and execute access") from e
            log.warning("skipped %s: not readable by this user (%s)", d, e)
        except FileNotFoundError as e:  # deleted while walked (checkpoint rotation): the next night sees
            log.warning("skipped %s: removed while it was read (%s)", d, e)
            vanished.append(d)

    def pipeline_components(d: Path) -> set[str] | None:
        """model_index.json's components, or None: no such file, or one that is not JSON (a copy
        still running, a full disk), which is skipped with a warning instead of failing every run."""
        index = d / "model_index.json"
        if not index.is_file():
            return None
        try:
            return {k for k in json.loads(index.read_text()) if not k.startswith("_")}
        except (ValueError, AttributeError) as e:
            log.warning("skipped %s as a pipeline folder: its model_index.json is not a JSON object (%s); a copy "
                        "still being written, or damaged (re-save the pipeline)", d, e)
            return None

    def visit(d: Path, depth: int, enclosing_pipeline: Path | None) -> None:
        components = pipeline_components(d)
        if components is not None:
            # a training output (pipeline + its checkpoints) is its own series; exported pipelines
            # side by side (step-1000/, step-2000/) are one series, their parent
            own = any(CKPT_DIR.match(p.name) for p in [*d.iterdir(), *(d / "checkpoints").glob("checkpoint-*")])
            suffixed = CKPT_SUFFIXED.match(d.name) if not (own or d == root) else None
            if settled(d) and suffixed:
                found.append(Checkpoint(str(d), str(d.parent / f"{d.parent.name}-{suffixed.group(2)}"),
                                        _step_of_folder(d), str(d), None))
            elif settled(d):
                found.append(Checkpoint(str(d), str(d if own or d == root else d.parent), _step_of_folder(d),
                                        str(d), None))
                if not (own or d == root):
                    side_by_side.append(len(found) - 1)
            enclosing_pipeline = d
        else:
            if (d / PICKLED_LORA).is_file() and not (d / LORA_FILE).is_file():
                pickled.append(d / PICKLED_LORA)  # diffusers' LoRA scripts with safe_serialization=False
            for f in _lora_files(d, lycoris):
                b = base or (str(enclosing_pipeline) if enclosing_pipeline else None)
                if b is None:
                    raise CheckpointError(f"{f} is a LoRA and no pipeline folder encloses it: set nightly.base_model "
                                          "to the pipeline it was fine-tuned from (a diffusers folder or hub id)")
                if not settled(f):
                    continue
                if f.name == LORA_FILE:  # the final LoRA diffusers' LoRA scripts save beside their checkpoint-<step>/
                    found.append(Checkpoint(str(d), str(d), _step_of_folder(d), b, None, str(f)))
                else:  # kohya's <name>-<step>.safetensors: a series per name
                    name, step = _kohya_series(f)
                    found.append(Checkpoint(str(f), str(d / name), step, b, None, str(f)))
        def walked(p: Path) -> bool:
            try:
                return p.is_dir() and not p.name.startswith(("_", ".")) and p.name not in (components or ()) \
                    and (CKPT_DIR.match(p.name) is not None or not _is_training_state(p))
            except OSError as e:  # unreadable (lost+found), or gone since listed: the siblings are walked
                log.warning("skipped %s: %s", p, e)
                return False

        for child in sorted(p for p in d.iterdir() if walked(p)):
            try:
                m = CKPT_DIR.match(child.name) or CKPT_SUFFIXED.match(child.name)
                suffix = m.group(2) if m and m.re is CKPT_SUFFIXED else None  # its unet/ is the export's: no unet_ema
                lora = child / LORA_FILE if (child / LORA_FILE).is_file() else None
                # a whole pipeline saved as checkpoint-<step>/ (pipe.save_pretrained) is a pipeline: walked, so
                # that its own VAE and text encoder are audited (it was taken for a bare UNet on a base)
                if m and not (child / "model_index.json").is_file() and ((child / "unet").is_dir() or lora):
                    if not lora and not suffix and _memex_train_checkpoint(child):
                        if enclosing_pipeline is None:
                            # a `memex train` run still training: its pipeline (scheduler, tokenizer) is saved at the
                            # end. It failed discovery ("set nightly.base_model"), and with it every run's audit; and no
                            # nightly.base_model is its base (it trains from scratch: its UNet on an SD base fails).
                            training.append(child)
                            continue
                        if enclosing_pipeline is not None and _step_of_folder(enclosing_pipeline) == int(m.group(1)) \
                                and (enclosing_pipeline / "memex_train.json").is_file():
                            continue  # the final checkpoint: the same weights as the pipeline the run ended with
                    unet = child / ("unet_ema" if ema and not lora and not suffix else "unet")
                    series = d.parent if d.name == "checkpoints" else d
                    series = series / f"{series.name}-{suffix}" if suffix else series
                    if not lora and not suffix and ema and not _has_weights(unet):
                        if settled(child):  # one still being written may get it yet
                            raw_only.append((str(series), child))
                        continue
                    if not lora and not suffix and ema:
                        ema_series.add(str(series))
                    if not lora and not suffix and not ema and _has_weights(child / "unet_ema"):
                        ema_unused.append(child)
                    weights = [lora] if lora else \
                        [f for f in unet.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)]
                    if not weights or not settled(child):
                        continue  # still being written
                    b = base or (str(enclosing_pipeline) if enclosing_pipeline else None)
                    if b is None:
                        what = "a LoRA" if lora else "a UNet"
                        raise CheckpointError(
                            f"{child} holds only {what} and no pipeline folder encloses it: set nightly.base_model to "
                            "the pipeline it was fine-tuned from (a diffusers folder or hub id)")
                    te = child / "text_encoder"  # DreamBooth's --train_text_encoder saves it beside unet/
                    te = str(te) if not lora and _has_weights(te) else None
                    found.append(Checkpoint(str(child), str(series), int(m.group(1)), b,
                                            None if lora else str(unet), str(lora) if lora else None, te))
                elif depth < MAX_DEPTH:
                    walk(child, depth + 1, enclosing_pipeline)
                else:  # at the limit a folder's checkpoint-<step>/ children are still read (above), not its subfolders
                    too_deep.append(child)
            except FileNotFoundError as e:  # rotated away while read (checkpoints_total_limit): that checkpoint only
                log.warning("skipped %s: removed while it was read (%s)", child, e)  # (its run's others were dropped)
                vanished.append(child)

    walk(root, 0, None)
    if too_deep:  # a run's checkpoints/ one level lower was left out without a word: its series had no steps
        log.warning("%d folder(s) %d levels below nightly.location=%s not searched (e.g. %s): give a location "
                    "closer to the training runs", len(too_deep), MAX_DEPTH + 1, location, too_deep[0])
    found = split_series(found, side_by_side)
    if training:
        log.warning("%d checkpoint(s) of a `memex train` run still training left out (e.g. %s): audited once the run "
                    "saves its pipeline beside checkpoints/", len(training), training[0])
    if pickled and (found or pending or training):  # alone, check_loose_weights names them and fails
        log.warning("%d LoRA(s) saved as pickle left out (e.g. %s): memex reads %s; convert each once with "
                    "safetensors.torch.save_file(torch.load(f), ...), or train with safe_serialization=True",
                    len(pickled), pickled[0], LORA_FILE)
    if lycoris:
        log.info("%d LyCORIS adapter(s) that are no LoRA left out (e.g. %s): diffusers cannot load them; merge each "
                 "into its base's UNet and save a diffusers folder", len(lycoris), lycoris[0])
    # a checkpoint of an EMA run without unet_ema/ (one a crash cut short, a copy or a sync that has not brought it
    # yet): left out, the rest of its run audited (the whole night stopped); a run with none was trained without it
    partial = [c for s, c in raw_only if s in ema_series]
    if partial:
        log.warning("%d checkpoint(s) of an EMA run left out: they have unet/ and no unet_ema/ (e.g. %s), which "
                    "nightly.ema=true audits (a checkpoint cut short, or copied without it)", len(partial), partial[0])
    raw_only = [c for s, c in raw_only if s not in ema_series]
    if raw_only:
        raise CheckpointError(
            f"nightly.ema=true audits checkpoint-<step>/unet_ema (diffusers' --use_ema), and {len(raw_only)} "
            f"checkpoint(s) under nightly.location={location} have unet/ only (e.g. {raw_only[0]}): that run was "
            "trained without --use_ema. Set nightly.ema=false, or give a nightly.location holding EMA runs only")
    if ema_unused:
        log.info("%d checkpoint(s) also hold unet_ema/ (e.g. %s): their raw unet/ is audited; nightly.ema=true "
                 "audits the EMA weights, which the run's final pipeline ships", len(ema_unused), ema_unused[0])
    # nothing found because checkpoints vanished mid-walk: their runs' files left (another checkpoint, a
    # half-deleted one) were named as weights memex does not read, and the night failed; the next night sees them
    if not found and not pending and not training and not vanished:
        check_loose_weights(root)
    # a final model (step None) after its series' checkpoints: audited last, gated against the last one, and,
    # where it holds the last checkpoint's very weights, that checkpoint keeps its own row and trend point
    return sorted(found, key=lambda c: (c.series, c.step is None, c.step or 0, c.location))


def split_series(found: list[Checkpoint], side_by_side: list[int]) -> list[Checkpoint]:
    """Exported pipelines side by side (step-1000/, step-2000/) are one series, their parent; but runs
    whose names differ before the step (dreambooth-dog-800/, dreambooth-cat-400/) were one series too,
    each gated against the other's previous step. Where a parent holds several such names, each
    numbered pipeline's series is <parent>/<name before its number>; one without a number stays the parent's."""
    groups: dict[str, list[int]] = {}
    for i in side_by_side:
        groups.setdefault(found[i].series, []).append(i)
    out = list(found)
    for parent, idx in groups.items():
        prefix = {i: m and Path(found[i].location).name[:m.start()]
                  for i in idx for m in [TRAILING_STEP.search(Path(found[i].location).name)]}
        if len({p for p in prefix.values() if p is not None}) > 1:
            for i, p in prefix.items():
                if p:  # "" (step-1000) and None (no number) stay in the parent's series
                    out[i] = replace(found[i], series=str(Path(parent) / p))
    return out


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir())


def _lora_files(d: Path, lycoris: list[Path]) -> list[Path]:
    """LoRAs saved as files of their own in `d`: diffusers' final pytorch_lora_weights.safetensors, and
    kohya's <name>-<step>.safetensors (sd-scripts' train_network.py), which model.lora reads too
    (diffusers converts its keys). Told from other weights by their safetensors header; a file
    that cannot be read yet (still being written) is left for the next night."""
    found = []
    for f in sorted(d.glob("*.safetensors")):
        try:
            kind = weights_file_kind(str(f)) if f.is_file() else None
        except ModelError:
            continue
        if kind == "lora":
            found.append(f)
        elif kind == "lycoris":  # told apart and named (discover logs them; alone, check_loose_weights fails)
            lycoris.append(f)
    return found


def check_loose_weights(root: Path) -> None:
    """A location with no checkpoint memex reads but with weight files it does not (single-file
    checkpoints, as A1111 and kohya save them) found nothing every night, quietly: 0 checkpoints,
    exit 0. Named now, with what each kind needs."""
    loose = sorted(f for depth in range(MAX_DEPTH + 1) for f in root.glob("/".join(["*"] * (depth + 1)))
                   if f.is_file() and f.name.endswith(SINGLE_FILE_SUFFIXES)
                   and not any(p.name.startswith(("_", ".")) for p in f.relative_to(root).parents if p.name))
    if not loose:
        return
    kinds: dict[str, list[Path]] = {}
    for f in loose:
        try:
            kinds.setdefault(weights_file_kind(str(f)), []).append(f)
        except ModelError:
            kinds.setdefault("unreadable", []).append(f)
    fixes = {"single_file": "single-file checkpoints (the original Stable Diffusion layout): convert each to a "
                            "diffusers folder with from_single_file(...).save_pretrained(...) (`memex audit "
                            "model.path=<the file>` prints the command), or have training save diffusers folders",
             "lora": "LoRA files where nightly does not look for them (inside a pipeline's component folders, "
                     "or a checkpoint-<step>/ that holds a unet/)",
             "lycoris": "LyCORIS adapters that are no LoRA (LoHa, LoKr, ...), which diffusers cannot load: merge "
                        "each into its base's UNet once and save diffusers folders",
             "other": "weight files that are neither a pipeline folder's nor a LoRA",
             "unreadable": "files that are not readable safetensors"}
    what = "; ".join(f"{len(fs)} {fixes[k]} (e.g. {fs[0].relative_to(root)})" for k, fs in sorted(kinds.items()))
    raise CheckpointError(f"nightly.location={root}: no checkpoint memex reads (diffusers pipeline folders, "
                          f"checkpoint-<step>/unet, LoRA files: checkpoint-<step>/{LORA_FILE}, kohya's "
                          f"<name>-<step>.safetensors), but {what}")


def _weight_files(folder: Path, skip: set[str] = frozenset()) -> list[Path]:
    """Weight files a load of `folder` reads: of a pipeline, only its model_index.json components
    (not checkpoints/ or anything else kept beside them); of a UNet folder, all of them."""
    index = folder / "model_index.json"
    if index.is_file():
        roots = [folder / k for k in sorted(json.loads(index.read_text())) if not k.startswith("_") and k not in skip]
    else:
        roots = [folder]
    return sorted(f for r in roots if r.is_dir() for f in r.rglob("*")
                  if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def _load_files(ckpt: Checkpoint) -> list[tuple[str, Path | None]]:
    """(name in the hash, file) for every weight file an audit of `ckpt` loads."""
    files: list[tuple[str, Path | None]] = []
    base = Path(ckpt.base)
    # the location too (discover takes local paths only): a pipeline folder is its own base, and once deleted it read
    # as a hub id with no weight files, a CheckpointError, not a deletion: the plan skipped it as unreadable, and a
    # folder rotated away as its audit ended stopped the night, the audit's row lost
    for part in (ckpt.location, ckpt.unet, ckpt.text_encoder, ckpt.lora):
        if part and not Path(part).exists():  # rotated away since discovery: hashing the rest named another model
            raise FileNotFoundError(f"{part} is gone (deleted since nightly found it)")
    if base.is_dir():
        replaced = {k for k in ("unet", "text_encoder") if getattr(ckpt, k)}
        files += [(f"base/{f.relative_to(base)}", f) for f in _weight_files(base, replaced)]
    else:  # a hub id: its name and revision are the identity we have
        files.append((f"hub:{ckpt.base}", None))
    if ckpt.unet:
        unet = Path(ckpt.unet)
        files += [(f"unet/{f.relative_to(unet)}", f) for f in _weight_files(unet)]
    if ckpt.text_encoder:
        te = Path(ckpt.text_encoder)
        files += [(f"text_encoder/{f.relative_to(te)}", f) for f in _weight_files(te)]
    if ckpt.lora:
        files.append((f"lora/{Path(ckpt.lora).name}", Path(ckpt.lora)))
    if not any(p for _, p in files):
        raise CheckpointError(f"{ckpt.location}: no weight files (*.safetensors, *.bin) to audit")
    return files


def files_signature(ckpt: Checkpoint) -> str:
    """sha256 of the weight files' names, sizes and mtimes: a stat per file, no reads. The ledger
    keeps it beside the content hash, so a checkpoint audited before is recognised every night
    without reading its weights again (100 Stable Diffusion checkpoints are ~350 GB to hash)."""
    h = hashlib.sha256()
    for name, path in _load_files(ckpt):
        st = path.stat() if path is not None else None
        h.update(f"{name}\0{st.st_size if st else ''}\0{st.st_mtime_ns if st else ''}\n".encode())
    return h.hexdigest()


def written_at(ckpt: Checkpoint) -> float | None:
    """When the checkpoint's weights were last written (the newest mtime of the files an audit loads), or None
    when none is there."""
    times = [p.stat().st_mtime for _, p in _load_files(ckpt) if p is not None and p.exists()]
    return max(times) if times else None


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: a file is read once a process


def weights_sha256(ckpt: Checkpoint, cache: dict | None = None) -> str:
    """sha256 over every weight file the audit loads: the base's (minus its UNet when overridden)
    and the checkpoint's UNet, each as <relative name, bytes>. A renamed or copied checkpoint
    keeps its hash (so it is not audited twice); changed weights get a new one.

    `cache` maps (path, size, mtime_ns) -> file digest (default: this process's, which
    model_weights_sha256 shares), so the base shared by every checkpoint of a run is read once per
    nightly invocation."""
    cache = _DIGESTS if cache is None else cache
    h = hashlib.sha256()
    for name, path in _load_files(ckpt):
        h.update(name.encode() + b"\0")
        if path is not None:
            h.update(_digest(path, cache).encode())
    return h.hexdigest()


def _digest(path: Path, cache: dict) -> str:
    """sha256 of one file, kept by (path, size, mtime_ns) in `cache`: read once a process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in cache:
        fh = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                fh.update(chunk)
        cache[key] = fh.hexdigest()
    return cache[key]


def is_final(ckpt: Checkpoint) -> bool:
    """Whether `ckpt` is the model its training saved at the end, beside its checkpoints: one with no step (a
    pipeline or pytorch_lora_weights.safetensors in output_dir), or kohya's <output_name>.safetensors (its
    step the metadata's ss_steps, the last checkpoint's)."""
    return ckpt.step is None or (ckpt.lora == ckpt.location and Path(ckpt.location).stem == Path(ckpt.series).name)


def loaded_model_sha256(ckpt: Checkpoint, variant: str | None = None) -> str | None:
    """sha256 of the model an audit of `ckpt` loads, by what it holds, not where (model_weights_sha256's
    by_content): checkpoint-<step>/unet on its base and the final pipeline train_text_to_image saves with that UNet
    give one sha, where weights_sha256 (base/unet/... against unet/...) gives two; that one keys the ledgers, so it
    stays as it is. None when nothing is local (a hub base not in the cache, no weights of its own)."""
    base = ckpt.base if Path(ckpt.base).is_dir() else cached_snapshot(ckpt.base) or ckpt.base
    return model_weights_sha256(base, ckpt.unet, ckpt.lora, ckpt.text_encoder, variant, by_content=True)


def _tensors_digest(path: Path) -> str:
    """sha256 of a safetensors file's tensors: its header less __metadata__, then its data (whose offsets count
    from the header's end: a longer metadata moves none). Read once a process, like _digest."""
    st = path.stat()
    key = ("tensors", str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        header, _, n = _safetensors_header(str(path))
        header.pop("__metadata__", None)
        fh = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        with open(path, "rb") as f:
            f.seek(8 + n)
            while chunk := f.read(HASH_CHUNK):
                fh.update(chunk)
        _DIGESTS[key] = fh.hexdigest()
    return _DIGESTS[key]


def model_weights_sha256(path: str, unet: str | None = None, lora: str | None = None,
                         text_encoder: str | None = None, variant: str | None = None,
                         by_content: bool = False) -> str | None:
    """sha256 over the weight files a load of this model reads (model.path, .unet, .lora, .text_encoder,
    .variant: models.loaded_weight_files), each as <name, bytes>; None for a hub id with nothing local (its
    name and revision are in the run's settings). Not nightly's weights_sha256, which covers every weight
    file of the folders: an fp16 variant downloaded beside the weights, or a safety checker deleted, is no
    other model. Magnitude: SD 1.5's fp32 UNet, VAE and text encoder, ~4 GB, in ~3-6 s, once a process.
    `by_content` (loaded_model_sha256): each file named by its component and file alone, the base's and an
    override's alike, and a LoRA by its tensors (sd-scripts stamps each save's time into its metadata); the
    names as they are key the run folders' weights.json (claim_weights), so they stay the default."""
    files = loaded_weight_files(path, unet, lora, text_encoder, variant)
    if not files:
        return None
    if by_content:
        files = sorted(("lora" if n.startswith("lora/") else n.removeprefix("base/"), f) for n, f in files)
    h = hashlib.sha256()
    for name, f in files:
        tensors = by_content and name == "lora" and f.endswith(".safetensors")
        h.update(name.encode() + b"\0" + (_tensors_digest(Path(f)) if tensors else _digest(Path(f), _DIGESTS)).encode())
    return h.hexdigest()


def claim_weights(store, where: str, sha: str | None, what: str, keys: str) -> None:
    """The model's weights as the folder was first written with them (`where`: its weights.json), or refuse.
    The folder's settings hold model.path and model.lora, not their weights: a LoRA retrained into the
    same output_dir (diffusers' scripts overwrite pytorch_lora_weights.safetensors) resumed the old run
    folder, found every shard done, and reported the old weights' extractions as the new ones'. A folder
    written before weights.json was kept takes today's weights as its record."""
    if sha is None:
        return
    was = store.read_json(where)
    if was is None:
        store.write_json(where, {"weights_sha256": sha})
    elif was.get("weights_sha256") != sha:
        raise CheckpointError(
            f"the weights at {keys} changed since {what} was written with them (weights sha256 "
            f"{str(was.get('weights_sha256'))[:12]}, now {sha[:12]}): its results are the old weights'. Nothing was "
            "changed. Audit the new weights under another run.name (or storage.root), or delete the folder to redo it")
