"""Where everything lives: the one place that defines paths, unit names and schemas.

    <storage.root>/<run name>/       one run folder per checkpoint x generation settings (RunLayout)
        run.json                     generation settings; a rerun must match them (a re-match's:
                                     its source run's, and samples_from, that run's name)
        weights.json                 sha256 of the model's weight files the samples were made with
                                     (generate; a rerun with other weights at the same paths is refused)
        prompts.parquet              prompt_id, prompt (PROMPTS_SCHEMA)
        index.json                   the membership index this run is matched against (audit only)
        rounds/round-000.json        the samples each budget round generates (memex/plan.py)
        triage/shard-000000.parquet  TRIAGE_SCHEMA: one row per prompt, its memorization score (audit)
        previews/shard-000000.parquet  PREVIEWS_SCHEMA: triage=preview's short-schedule generations
        samples/shard-000000.parquet SAMPLES_SCHEMA rows, one file per shard (generate)
        candidates/shard-000000.parquet  CANDIDATES_SCHEMA: one row per prompt (filter)
        matches/shard-000000.parquet MATCHES_SCHEMA: one row per verified candidate of samples shard 0 (match)
        summary.json                 the audit's headline numbers, per-prompt results, thresholds, config (match)
        matched_train_images.parquet MATCHED_TRAIN_SCHEMA: the matched training images (for the report)
        report/index.html            the audit's self-contained HTML report (memex/report.py)
        logs/<stage>-<time>.log      each command's full log; <stage>-<time>-traceback.txt: a failed unit's
        _lease.json                  while an audit or generation works in the folder: who (memex/lease.py)
      each stage folder also holds _markers/shard-*.json (a unit is complete), _SUCCESS.json (the
      stage is complete), for filter and match _settings.json (a rerun must match them), and on Ray
      _attempts/shard-*.json (how often the current command started the unit: memex/runner.py).
      A stage folder holds one dataset's Parquet files and nothing else but `_`-prefixed names,
      which pyarrow skips: `pyarrow.dataset.dataset("<run>/samples")` reads it as it is (likewise
      triage/, candidates/, matches/, and the index's dups/ and quarantine/). Run folders written
      before summary.json moved out of matches/ are still read (`RunLayout.read_summary`,
      `matched_train_source`), but matches/ of such a folder holds two non-dataset files.
      A re-match's run folder (`memex audit run.samples_from=<run>`, memex/stages/rematch.py) holds
      run.json, index.json, candidates/, matches/, summary.json, matched_train_images.parquet,
      report/ and logs/; prompts, rounds, triage, previews and samples are its source run's
      (`RunLayout.generated`), read where they are and never written.

    <storage.root>/<run name>/mia/   `memex mia` (MiaLayout; an audit's run folder may hold one too)
        run.json                     model, image sets and attack settings; a rerun must match them
        weights.json                 sha256 of the model's weight files the scores are of (as the run folder's)
        images.parquet               MIA_IMAGES_SCHEMA: every scored image, its label (member) and source
        quarantine.parquet           QUARANTINE rows: images that did not decode (not scored)
        scores/shard-000000.parquet  MIA_SCORES_SCHEMA: raw attack values of images [i*unit, (i+1)*unit)
        shadows/shard-000000.parquet MIA_SHADOW_SCHEMA: LiRA shadow model 0's loss on every image
        shadow_data/shadow-000000.parquet   the training manifest of shadow model 0 (its half)
        shadow_models/shadow-000000/ shadow model 0, a diffusers folder (`memex train`)
        lira.parquet                 MIA_LIRA_SCHEMA: LiRA's likelihood ratios
        summary.json                 AUC, TPR at 1% and 0.1% FPR, balanced accuracy per attack
      and <run>/report/mia.html, the page of the ROC curves (memex/mia_report.py)

    <index root>/<index key>/        the membership index of one training set (IndexLayout),
        index.json                   shared by every run on the same data, embedder and index settings
        train_rows.parquet           TRAIN_FILE_SCHEMA: the ingested training set, gid = row number, and where
                                     each row's image lies in train.pack (memex/train_rows.py)
        train.pack                   the training images' encoded bytes end to end, in gid order
        train.parquet                TRAIN_SCHEMA, images inline: an index built before train.pack (read only)
        quantizer/shard-000000.faiss IVF-PQ only: the trained, empty index every shard copies
        shards/shard-000000.faiss    FAISS shard (global ids)
        shards/vectors-shard-000000.npz      its vectors and gids (np.savez: the dups step re-searches them)
        quarantine/shard-000000.parquet  QUARANTINE rows of shard 0: unreadable training images and why
        dups/shard-000000.parquet    DUPS_SCHEMA: near-duplicate count per training image
        links/shard-000000.parquet   LINKS_SCHEMA: the near-duplicate edges dups unit 0 found, as a forest
        pictures.parquet             PICTURES_SCHEMA: every row with a near-duplicate and its picture
        _SUCCESS.json                IndexInfo (memex/stages/index.py), written when all of it is complete
        _lease.json                  while an audit builds it: who (memex/lease.py; others wait)
    <index root>/_shard_listings/<hash>.parquet   a WebDataset shard's image members, their offsets and sizes,
                                     and captions, by its URI and version (memex/ingest.py: listing a shard
                                     reads all of it; memex/shards.py reads a member at its offset)

Reads, atomic writes and the marker convention are memex/storage.py's.
"""

from __future__ import annotations

import functools
import posixpath
from typing import Any

import pyarrow as pa

from memex.storage import StageFolder, StorageError, Store, unit_name  # noqa: F401 - StorageError: re-exported

# run.json's key in a re-match's run folder: the run (a folder name under storage.root) whose
# generations it matches (memex/stages/rematch.py)
SAMPLES_FROM = "samples_from"
# and what those generations were when it was made (rows, shards, rounds, UNet evaluations)
SOURCE_GENERATIONS = "source_generations"
SHARD_LISTINGS = "_shard_listings"  # under the index root: WebDataset shards' listings (memex/ingest.py)

PROMPTS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string())])

SAMPLES_ROW_GROUP = 64  # generations per Parquet row group of a samples shard (RunLayout.samples)

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
        # Wen et al.'s score of this sample's first step, ||eps(x_T, prompt) - eps(x_T, "")|| RMS
        # (memex/sampling.py noise_norm), free under guidance; null without guidance
        ("triage_score", pa.float32()),
        ("round", pa.int32()),  # the budget round that generated it (memex/plan.py)
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

TRIAGE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        # higher: more likely memorized. noise_norm: mean noise_norm over triage.seeds x triage.steps
        # (memex/sampling.py); preview: minus `distance`
        ("score", pa.float32()),
        ("unet_evaluations", pa.int64()),  # this prompt's share: seeds x steps x (2 with guidance, or noise_norm)
        # preview only (null for noise_norm): the smallest tiled l2 from any of the prompt's previews to
        # its nearest training image among match.k proposed by the index
        ("distance", pa.float32()),
        ("train_gid", pa.int64()),  # preview only: that training image (gid of train.parquet)
    ]
)
# triage=preview: the short-schedule generations whose nearest training images score the prompt
PREVIEWS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("sample_index", pa.int32()),  # seed: sample_seed(run seed, prompt id, sample_index)
        ("image", pa.binary()),  # PNG bytes
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
        # the matched training image's tile_detail (memex/distances.py): below match.threshold it is
        # low complexity, and one close generation is not enough to call it copied (summary: pictures)
        ("train_detail", pa.float32()),
        # tiled l2, extracted rows: distance / the distance to the nearest *other* picture among the k
        # neighbours (not one within match.threshold of the matched image). A copy sits far closer
        # to one picture (demo: <= 0.56); a generic look-alike nearly as close to the next (0.64+).
        # Null: relative l2 (already a ratio), not extracted, or no other picture among the k.
        ("margin", pa.float32()),
    ]
)

# <run>/matched_train_images.parquet: the training images the verified candidates matched, copied into
# the run folder so its report can be rebuilt from the run folder alone: those of the extracted matches
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
# train.parquet as written: the image bytes in train.pack (image_offset, image_length: null for a row whose
# image is read from its uri), so that a row's image is one ranged read (memex/train_rows.py)
TRAIN_FILE_SCHEMA = pa.schema(
    [("gid", pa.int64()), ("id", pa.string()), ("uri", pa.string()), ("caption", pa.string()),
     ("image_offset", pa.int64()), ("image_length", pa.int64())]
)
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("reason", pa.string())])
DUPS_SCHEMA = pa.schema([("gid", pa.int64()), ("id", pa.string()), ("caption", pa.string()),
                         ("near_duplicates", pa.int32())])  # other rows within index.dup_threshold (exact)
# (gid, root): the near-duplicate edges one dups unit found, folded to a forest (memex.index.Components)
LINKS_SCHEMA = pa.schema([("gid", pa.int64()), ("root", pa.int64())])
# every training row in a group of near-duplicates (rows of one image: LAION duplicates, re-encodings):
# picture = the smallest gid of its connected component over all shards' links. A row not listed is a
# picture of its own (its gid).
PICTURES_SCHEMA = pa.schema([("gid", pa.int64()), ("id", pa.string()), ("picture", pa.int64())])


# memex mia: raw attack values are lower = member (memex/mia.py); LiRA's ratios higher = member
MIA_IMAGES_SCHEMA = pa.schema([("image_id", pa.string()), ("member", pa.bool_()), ("image", pa.binary()),
                               ("uri", pa.string()), ("caption", pa.string()),
                               ("copies", pa.int32())])  # copies: times in the training set, when known
MIA_SCORES_SCHEMA = pa.schema([("image_id", pa.string()), ("member", pa.bool_()), ("caption", pa.string()),
                               ("copies", pa.int32()), ("loss", pa.float32()), ("pia", pa.float32()),
                               ("secmi", pa.float32())])  # an attack not run: null
MIA_SHADOW_SCHEMA = pa.schema([("shadow", pa.int32()), ("image_id", pa.string()), ("in_training", pa.bool_()),
                               ("loss", pa.float32())])
MIA_LIRA_SCHEMA = pa.schema([("image_id", pa.string()), ("lira_online", pa.float32()),
                             ("lira_offline", pa.float32()), ("shadows_in", pa.int32())])


def shard_name(index: int) -> str:
    return unit_name(index) + ".parquet"


# <run or index folder>/logs/: each command's log file (memex/console.py, <stage>-<time>.log) and the
# full traceback of a unit that failed on Ray (memex/runner.py, <stage>-<time>-traceback.txt)
LOGS = "logs"


def log_path(store: Store, name: str) -> str:
    """Path of a log file in the run (or index) folder of `store`: <folder>/logs/<name>."""
    return store.join(LOGS, name)


class _Folder:
    """A folder on a Store (`self.store`): its URI, paths inside it, its lease (memex/lease.py)."""

    store: Store

    @property
    def uri(self) -> str:
        """The folder as a URI a user can paste (s3://bucket/runs/name or /abs/path)."""
        return self.store.uri

    def join(self, *parts: str) -> str:
        return self.store.join(*parts)

    @property
    def lease_path(self) -> str:
        return self.join("_lease.json")


class RunLayout(_Folder):
    """Paths of one run folder `<root>/<run name>` on any fsspec filesystem (I/O: `layout.store`)."""

    def __init__(self, root: str, run_name: str, storage_options: dict[str, Any] | None = None):
        # root "s3://" (RunLayout.at of a bucket itself): "s3://" + name, not "s3:" + "/" + name (local disk)
        self.root = root if root.endswith("://") else root.rstrip("/")
        self.store = Store(self._under_root(run_name), storage_options)
        self.run_name = run_name
        self.candidates = StageFolder(self.store, "candidates", schema=CANDIDATES_SCHEMA)
        self.matches = StageFolder(self.store, "matches", schema=MATCHES_SCHEMA)

    def _under_root(self, name: str) -> str:
        return self.root + ("" if self.root.endswith("://") else "/") + name

    # ---- the generations: this folder's own, or a re-match's source run's --------------------
    # A re-match (`memex audit run.samples_from=<run>`) matches another run's generations with other
    # filter or match settings: its run.json names that run, and prompts, rounds, triage, previews
    # and samples are read from there; candidates/, matches/, summary.json and report/ are its own.
    @functools.cached_property
    def samples_from(self) -> str | None:
        """The run whose generations this folder matches (run.json's samples_from), or None: its own.
        One read of run.json per layout, on first use."""
        return (self.store.read_json(self.run_json) or {}).get(SAMPLES_FROM)

    @functools.cached_property
    def generated(self) -> Store:
        """The folder that holds the generations: this one, or a re-match's source run folder."""
        src = self.samples_from
        return self.store if src is None else Store(self._under_root(src), self.store.options)

    @functools.cached_property
    def triage(self) -> StageFolder:
        return StageFolder(self.generated, "triage", schema=TRIAGE_SCHEMA)

    @functools.cached_property
    def previews(self) -> StageFolder:
        return StageFolder(self.generated, "previews", schema=PREVIEWS_SCHEMA)

    @functools.cached_property
    def samples(self) -> StageFolder:
        # row groups of 64 generations: a shard holds a prompt-major run of prompts (500 samples in shards of
        # 512: most prompts span two), and a reader of one prompt's samples (the filter, the report) skips
        # the groups whose prompt_id statistics exclude it; as one group, each shard was read whole by each
        # of its prompts (2x the reads, and both shards' PNGs at the filter's peak)
        return StageFolder(self.generated, "samples", schema=SAMPLES_SCHEMA, row_group_size=SAMPLES_ROW_GROUP)

    @classmethod
    def at(cls, run_uri: str, storage_options: dict[str, Any] | None = None) -> "RunLayout":
        """The layout of an existing run folder given by its own URI (`memex report RUN`)."""
        run_uri = run_uri.rstrip("/")
        proto, sep, path = run_uri.rpartition("://")  # dirname("s3://bucket") is "s3:", a local folder
        parent, name = posixpath.split(path)
        return cls(f"{proto}{sep}{parent}" if sep else parent or ".", name, storage_options)

    @property
    def path(self) -> str:
        return self.store.path

    @property
    def run_json(self) -> str:
        return self.join("run.json")

    @property
    def prompts_path(self) -> str:
        return self.generated.join("prompts.parquet")

    @property
    def index_json(self) -> str:
        return self.join("index.json")

    @property
    def weights_json(self) -> str:
        """The model's weights as the samples were generated with them (checkpoints.claim_weights)."""
        return self.join("weights.json")

    @property
    def summary_path(self) -> str:
        return self.join("summary.json")

    @property
    def matched_train_path(self) -> str:
        return self.join("matched_train_images.parquet")

    # Where run folders written before these two left matches/ (which must hold matches alone, so
    # that pyarrow reads it as one dataset) kept them: still read, never written.
    @property
    def legacy_summary_path(self) -> str:
        return self.join("matches", "summary.json")

    @property
    def legacy_matched_train_path(self) -> str:
        return self.join("matches", "train_images.parquet")

    def read_summary(self) -> dict | None:
        """The audit's summary.json (or an older run folder's matches/summary.json); None when
        the audit has not finished."""
        s = self.store.read_json(self.summary_path)
        return s if s is not None else self.store.read_json(self.legacy_summary_path)

    def matched_train_source(self) -> str | None:
        """Path of the matched training images (an older run folder's too); None when absent."""
        return next((p for p in (self.matched_train_path, self.legacy_matched_train_path) if self.store.exists(p)),
                    None)

    @property
    def report_path(self) -> str:
        return self.join("report", "index.html")


class IndexLayout(_Folder):
    """Paths of one membership index `<index root>/<key>/` (see the module docstring).

    The key hashes the training-set listing, the embedder and the index settings, so every audit of
    checkpoints trained on the same data reuses the index instead of re-embedding the training set.
    """

    def __init__(self, root: str, key: str, storage_options: dict[str, Any] | None = None):
        self.store = Store(root.rstrip("/") + "/" + key, storage_options)
        self.key = key
        self.quantizer = StageFolder(self.store, "quantizer")
        self.shards = StageFolder(self.store, "shards")
        self.dups = StageFolder(self.store, "dups", schema=DUPS_SCHEMA)
        # written by the shards units (no markers of its own): kept apart from the FAISS files so that
        # pyarrow reads quarantine/ as one dataset
        self.quarantine = StageFolder(self.store, "quarantine", schema=QUARANTINE_SCHEMA)
        # written by the dups units before their tables (no markers of its own), read once to join them
        self.links = StageFolder(self.store, "links", schema=LINKS_SCHEMA)

    @property
    def info_json(self) -> str:
        return self.join("index.json")

    @property
    def rows_path(self) -> str:
        """train_rows.parquet: the training rows and where each one's image lies in train.pack."""
        return self.join("train_rows.parquet")

    @property
    def pack_path(self) -> str:
        return self.join("train.pack")

    @property
    def inline_train_path(self) -> str:
        """train.parquet: an index built before train.pack holds its rows and their images here (read,
        never written: memex/train_rows.py)."""
        return self.join("train.parquet")

    @property
    def success_path(self) -> str:
        return self.join("_SUCCESS.json")

    @property
    def quantizer_path(self) -> str:
        return self.quantizer.file(0, ".faiss")

    def faiss_path(self, shard: int) -> str:
        return self.shards.file(shard, ".faiss")

    def vectors_path(self, shard: int) -> str:
        return self.shards.file(shard, ".npz", kind="vectors")

    def quarantine_path(self, shard: int) -> str:
        return self.quarantine.file(shard)

    def links_path(self, shard: int) -> str:
        return self.links.file(shard)

    @property
    def pictures_path(self) -> str:
        return self.join("pictures.parquet")


class MiaLayout(_Folder):
    """Paths of `memex mia`'s folder `<root>/<run name>/mia/` (see the module docstring)."""

    def __init__(self, root: str, run_name: str, storage_options: dict[str, Any] | None = None):
        self.run = Store(root.rstrip("/") + "/" + run_name, storage_options)  # the run folder (report/, logs/)
        self.store = Store(self.run.uri.rstrip("/") + "/mia", storage_options)
        self.run_name = run_name
        self.scores = StageFolder(self.store, "scores", schema=MIA_SCORES_SCHEMA)
        self.shadows = StageFolder(self.store, "shadows", schema=MIA_SHADOW_SCHEMA)

    @property
    def run_json(self) -> str:
        return self.join("run.json")

    @property
    def images_path(self) -> str:
        return self.join("images.parquet")

    @property
    def quarantine_path(self) -> str:
        return self.join("quarantine.parquet")

    @property
    def weights_json(self) -> str:
        """The model's weights as the folder was scored with them (checkpoints.claim_weights)."""
        return self.join("weights.json")

    @property
    def pixels_path(self) -> str:
        """{image id: sha256 of its decoded pixels} when the folder was first scored: a resume checks them."""
        return self.join("pixels.json")

    @property
    def lira_path(self) -> str:
        return self.join("lira.parquet")

    @property
    def summary_path(self) -> str:
        return self.join("summary.json")

    def shadow_data(self, shadow: int) -> str:
        return self.join("shadow_data", unit_name(shadow, "shadow") + ".parquet")

    def shadow_model(self, shadow: int) -> str:
        return self.join("shadow_models", unit_name(shadow, "shadow"))

    @property
    def report_path(self) -> str:
        return self.run.join("report", "mia.html")
