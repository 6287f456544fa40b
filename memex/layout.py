"""Storage layout of a run: the one place that defines paths, shard names, schemas and markers.

    <storage.root>/<run name>/
        run.json                     generation settings; a rerun must match them
        prompts.parquet              prompt_id, prompt (PROMPTS_SCHEMA)
        samples/shard-000000.parquet SAMPLES_SCHEMA rows, one file per shard
        samples/_markers/shard-000000.json   written last: the shard is complete
        samples/_SUCCESS.json        the whole stage is complete
        candidates/shard-000000.parquet  CANDIDATES_SCHEMA: one row per prompt (filter stage)
        candidates/_settings.json    filter settings; a rerun must match them
        matches/shard-000000.parquet MATCHES_SCHEMA: one row per verified candidate (match stage)
        matches/summary.json         headline numbers, per-prompt results, thresholds, config
        matches/train_images.parquet MATCHED_TRAIN_SCHEMA: the matched training images (for the report)
        report/index.html            the audit's self-contained HTML report (memex/report.py)

    <index root>/<index key>/        the membership index of one training set (IndexLayout);
        index.json                   shared by every run on the same data, embedder and index settings
        train.parquet                TRAIN_SCHEMA: the ingested training set, gid = row number
        shard-000000.faiss           FAISS shard (global ids), emb-shard-000000.npy its vectors
        quarantine-shard-000000.parquet  QUARANTINE rows: unreadable training images and why
        dups-shard-000000.parquet    DUPS_SCHEMA: near-duplicate count per training image
        _markers/shard-000000.json, _markers/dups-000000.json, _SUCCESS.json

A shard is written to a `_tmp-<uuid>-` file beside its final name and moved into place, then its marker is written; only a
shard with a marker counts, so a run killed at any point resumes by regenerating unmarked shards
(deterministic seeds make the redone shard identical). Parquet readers skip `_`-prefixed paths,
so `pyarrow.dataset.dataset(".../samples")` never sees temp files or markers.
Any fsspec URI works (local paths, s3:// through s3fs, memory:// in tests).
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq

from memex.config import MemexError

STAGES = ("samples", "candidates", "index", "matches", "report")
SHARD_DIGITS = 6  # up to 1M shards: 175M samples at 175 per shard

PROMPTS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string())])

SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),  # "<prompt_id>/<sample_index>"
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),  # memex.sampling.sample_seed(run seed, prompt id, index)
        ("image", pa.binary()),  # PNG bytes
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("model_id", pa.string()),
        ("scheduler", pa.string()),
        ("num_inference_steps", pa.int32()),
        ("guidance_scale", pa.float32()),
        ("dtype", pa.string()),
        ("batch_size", pa.int32()),  # the fixed UNet batch shape: needed to regenerate bit-exactly
    ]
)


CANDIDATES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("n_samples", pa.int32()),
        ("clique_size", pa.int32()),  # a real clique: lower bound of the maximum (memex/cliques.py)
        ("clique_upper_bound", pa.int32()),  # proven bound on the maximum clique
        ("clique_exact", pa.bool_()),  # size == maximum clique size
        ("flagged", pa.bool_()),  # clique_size >= filter.min_clique
        ("sample_ids", pa.list_(pa.string())),  # the clique's members
        ("representative", pa.string()),  # the clique's medoid sample
        # per sample (in sample_index order), tiled l2 to its nearest other generation of the prompt:
        # the report's histogram of how close generations come to collapsing onto one image
        ("nearest_distances", pa.list_(pa.float32())),
    ]
)

MATCHES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("train_gid", pa.int64()),  # row of the index's train.parquet
        ("train_id", pa.string()),  # id in the user's manifest
        ("train_caption", pa.string()),
        ("distance", pa.float32()),  # verification distance on pixels (match.distance)
        ("embed_distance", pa.float32()),  # distance in the index's embedding space
        ("neighbor_rank", pa.int32()),  # rank of this training image among the index's k results
        ("extracted", pa.bool_()),  # distance <= match.threshold
    ]
)

# matches/train_images.parquet: the training images the verified candidates matched, copied into
# the run folder so its report can be rebuilt from the run folder alone (a few per flagged prompt)
MATCHED_TRAIN_SCHEMA = pa.schema([("train_gid", pa.int64()), ("train_id", pa.string()), ("image", pa.binary())])

# The nightly ledger: one row per audited checkpoint and config (memex/ledger.py)
LEDGER_SCHEMA = pa.schema(
    [
        ("location", pa.string()),  # the checkpoint: a diffusers folder, or a checkpoint-<step> folder
        ("series", pa.string()),  # the training run it belongs to (growth is measured within a series)
        ("step", pa.int64()),  # training step; null when the folder does not say
        ("base", pa.string()),  # the base pipeline a checkpoint-<step>/unet is loaded on ("" for full folders)
        ("weights_sha256", pa.string()),  # content hash of every weight file the audit loads
        ("files_signature", pa.string()),  # hash of those files' names, sizes and mtimes: skips re-hashing
        ("config_sha256", pa.string()),  # hash of the settings that decide the audit's result
        ("run", pa.string()),  # run folder URI
        ("report", pa.string()),  # the run's report/index.html URI
        ("samples", pa.int64()),
        ("extracted", pa.int64()),  # unique training images extracted (the budget counts these)
        ("extracted_generations", pa.int64()),
        ("flagged_prompts", pa.int64()),
        ("started", pa.timestamp("s", tz="UTC")),
        ("finished", pa.timestamp("s", tz="UTC")),
        ("outcome", pa.string()),  # ok | over_budget | grew | error
        ("message", pa.string()),  # why, for anything but ok
    ]
)

TRAIN_SCHEMA = pa.schema(
    [("gid", pa.int64()), ("id", pa.string()), ("image", pa.binary()), ("uri", pa.string()), ("caption", pa.string())]
)
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("reason", pa.string())])
DUPS_SCHEMA = pa.schema([("gid", pa.int64()), ("id", pa.string()), ("caption", pa.string()),
                         ("near_duplicates", pa.int32())])


class StorageError(MemexError, RuntimeError):
    """Storage is unreachable, or holds something that conflicts with this run."""


def shard_name(index: int) -> str:
    return f"shard-{index:0{SHARD_DIGITS}d}.parquet"


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds work units [start, stop); unit u is (prompt u // n, sample u % n)."""

    index: int
    start: int
    stop: int


def plan_shards(n_prompts: int, samples_per_prompt: int, shard_size: int) -> list[ShardPlan]:
    total = n_prompts * samples_per_prompt
    return [
        ShardPlan(i, start, min(start + shard_size, total))
        for i, start in enumerate(range(0, total, shard_size))
    ]


def iter_units(plan: ShardPlan, samples_per_prompt: int) -> Iterator[tuple[int, int]]:
    """(prompt row, sample index) for each unit of a shard, prompt-major."""
    for u in range(plan.start, plan.stop):
        yield divmod(u, samples_per_prompt)


class RunLayout:
    """Paths and atomic reads/writes for one run folder on any fsspec filesystem."""

    def __init__(self, root: str, run_name: str, storage_options: dict[str, Any] | None = None):
        self.storage_options = dict(storage_options or {})
        self.fs, base = fsspec.core.url_to_fs(root, **self.storage_options)
        self.protocol = root.split("://", 1)[0] if "://" in root else "file"
        self.path = posixpath.join(base.rstrip("/"), run_name)  # filesystem path, no protocol
        self.root_uri = root
        self.run_name = run_name

    # ---- paths -------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        """The run folder as a URI a user can paste (s3://bucket/runs/name or /abs/path)."""
        return self.path if self.protocol == "file" else f"{self.protocol}://{self.path}"

    def uri_of(self, path: str) -> str:
        """A filesystem path of this layout as a URI (for functions that open URIs themselves)."""
        return path if self.protocol == "file" else f"{self.protocol}://{path}"

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def stage_dir(self, stage: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
        return self.join(stage)

    def shard_path(self, stage: str, index: int) -> str:
        return posixpath.join(self.stage_dir(stage), shard_name(index))

    def marker_path(self, stage: str, index: int) -> str:
        return posixpath.join(self.stage_dir(stage), "_markers", shard_name(index).replace(".parquet", ".json"))

    @property
    def run_json(self) -> str:
        return self.join("run.json")

    @property
    def prompts_path(self) -> str:
        return self.join("prompts.parquet")

    # ---- run folder --------------------------------------------------------------------
    def create(self) -> None:
        """Create the run folder and stage folders; fail early, naming the URI, if storage is unreachable."""
        self._create([self.stage_dir(stage) for stage in STAGES], "run folder",
                     "storage.root (bucket name, folder permissions) and storage.options (endpoint_url, credentials)")

    def _create(self, folders: list[str], what: str, keys: str) -> None:
        """Make folders and write + delete a probe file: an unreachable store fails here, not mid-run."""
        try:
            for folder in folders:
                self._mkdirs(folder)
            probe = self.join(f"_tmp-probe-{uuid.uuid4().hex}")
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 - re-raised with the URI and the fix
            raise StorageError(f"cannot write to {what} {self.uri}: {type(e).__name__}: {e}. Check {keys}.") from e

    def read_json(self, path: str) -> dict | None:
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_json(self, path: str, obj: dict) -> None:
        self._atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def claim_run(self, settings: dict) -> None:
        """Record the generation settings, or check that an existing run folder used the same ones.

        Resuming with different settings would mix two experiments in one dataset, so it is refused.
        """
        existing = self.read_json(self.run_json)
        if existing is None:
            self.write_json(self.run_json, settings)
            return
        diff = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
        if diff:
            detail = "; ".join(f"{k}: was {existing.get(k)!r}, now {settings.get(k)!r}" for k in diff)
            raise StorageError(
                f"run folder {self.uri} was written with different settings ({detail}). "
                "Nothing was changed. Use another run.name (or storage.root) for a new experiment."
            )

    def claim_stage(self, stage: str, settings: dict) -> None:
        """Like claim_run, for a later stage's own settings (filter thresholds, index, match)."""
        path = posixpath.join(self.stage_dir(stage), "_settings.json")
        existing = self.read_json(path)
        if existing is None:
            self.write_json(path, settings)
        elif existing != json.loads(json.dumps(settings, default=str)):
            diff = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
            raise StorageError(
                f"{stage}/ in run folder {self.uri} was written with other settings ({', '.join(diff)}). "
                f"Nothing was changed. Use another run.name, or delete {self.stage_dir(stage)} to redo the stage.")

    # ---- shards ------------------------------------------------------------------------
    def is_complete(self, stage: str, index: int) -> bool:
        return self.fs.exists(self.marker_path(stage, index))

    def complete_shards(self, stage: str) -> list[int]:
        markers = self.fs.glob(posixpath.join(self.stage_dir(stage), "_markers", "shard-*.json"))
        return sorted(int(posixpath.basename(m)[6 : 6 + SHARD_DIGITS]) for m in markers)

    def write_shard(self, stage: str, index: int, table: pa.Table, meta: dict | None = None) -> None:
        """Write one shard atomically: temp file, move into place, then the completion marker."""
        self._atomic_write_table(self.shard_path(stage, index), table)
        self.write_json(self.marker_path(stage, index), {"rows": table.num_rows, "file": shard_name(index), **(meta or {})})

    def read_stage(self, stage: str, columns: list[str] | None = None) -> pa.Table:
        """All complete shards of a stage as one table (shards without a marker are ignored)."""
        paths = [self.shard_path(stage, i) for i in self.complete_shards(stage)]
        schema = {"samples": SAMPLES_SCHEMA, "candidates": CANDIDATES_SCHEMA, "matches": MATCHES_SCHEMA}.get(stage)
        if not paths:
            return schema.empty_table() if schema is not None else pa.table({})
        return pq.ParquetDataset(paths, filesystem=self.fs, schema=schema).read(columns=columns)

    @property
    def summary_path(self) -> str:
        return self.join("matches", "summary.json")

    @property
    def matched_train_path(self) -> str:
        return self.join("matches", "train_images.parquet")

    @property
    def report_path(self) -> str:
        return self.join("report", "index.html")

    def write_bytes(self, path: str, data: bytes) -> None:
        self._atomic_write(path, data)

    def write_table(self, path: str, table: pa.Table, row_group_size: int | None = None) -> None:
        self._atomic_write_table(path, table, row_group_size)

    def write_prompts(self, prompts: pa.Table) -> None:
        self._atomic_write_table(self.prompts_path, prompts.cast(PROMPTS_SCHEMA))

    def read_prompts(self) -> pa.Table:
        return pq.read_table(self.prompts_path, filesystem=self.fs, schema=PROMPTS_SCHEMA)

    # ---- helpers -----------------------------------------------------------------------
    def _mkdirs(self, path: str) -> None:
        # Object stores have no folders, and s3fs.makedirs *creates a missing bucket*: a typo in
        # storage.root would silently make a new bucket. Only local filesystems get folders.
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(path, exist_ok=True)

    def _tmp_path(self, final: str) -> str:
        return posixpath.join(posixpath.dirname(final), f"_tmp-{uuid.uuid4().hex}-{posixpath.basename(final)}")

    def _atomic_write(self, path: str, data: bytes) -> None:
        self._mkdirs(posixpath.dirname(path))
        tmp = self._tmp_path(path)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)

    def _atomic_write_table(self, path: str, table: pa.Table, row_group_size: int | None = None) -> None:
        self._mkdirs(posixpath.dirname(path))
        tmp = self._tmp_path(path)
        pq.write_table(table, tmp, filesystem=self.fs, compression="zstd", row_group_size=row_group_size)
        self.fs.mv(tmp, path)


class IndexLayout(RunLayout):
    """One membership index: `<index root>/<key>/` (see the module docstring).

    The key hashes the training-set listing, the embedder and the index settings, so every audit of
    checkpoints trained on the same data reuses the index instead of re-embedding the training set.
    """

    def create(self) -> None:
        self._create([self.join("_markers")], "index folder", "index.root / storage.root and storage.options")

    @property
    def info_json(self) -> str:
        return self.join("index.json")

    @property
    def train_path(self) -> str:
        return self.join("train.parquet")

    def faiss_path(self, shard: int) -> str:
        return self.join(f"shard-{shard:0{SHARD_DIGITS}d}.faiss")

    def emb_path(self, shard: int) -> str:
        return self.join(f"emb-shard-{shard:0{SHARD_DIGITS}d}.npy")

    def quarantine_path(self, shard: int) -> str:
        return self.join(f"quarantine-{shard_name(shard)}")

    def dups_path(self, shard: int) -> str:
        return self.join(f"dups-{shard_name(shard)}")

    def marker(self, kind: str, shard: int) -> str:
        return self.join("_markers", f"{kind}-{shard:0{SHARD_DIGITS}d}.json")

    def read_table(self, path: str, schema: pa.Schema | None = None, filters=None) -> pa.Table:
        return pq.read_table(path, filesystem=self.fs, schema=schema, filters=filters)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            return f.read()
