"""`memex audit`: index -> prompts -> triage -> generate (in rounds) -> match -> filter -> report.

  1. check inputs (config ranges, the model folder, the training set) before any cluster work;
  2. index the training set (reused when an earlier audit built the same one); its near-duplicate
     counts rank the captions used as prompts (prompts=near_duplicates, the paper's choice);
  3. triage (memex/stages/triage.py, text models): a memorization score per prompt, a few UNet
     calls each (Wen et al.);
  4. generate (memex/stages/generate.py): samples/ in the run folder. budget=fixed: every prompt
     sampling.samples_per_prompt times. budget=adaptive: in rounds (`generate_in_rounds`), each
     round's generations matched as soon as they exist, and only the prompts that show a sign of
     memorization (a copy, a near miss, an outlying triage score) sampled further;
  5. filter: flag prompts whose generations form a clique (candidates/): the paper's evidence that
     needs no training set; skipped for an unconditional model (one prompt: an N x N graph);
  6. match: nearest training images from the sharded index, verified on pixels (matches/): the
     flagged cliques' members (match.candidates=cliques) or every generation (=all);
  7. write the HTML report into report/ (memex/report.py) and print the summary.
  8. tracker=mlflow|tensorboard|wandb: log the headline numbers at tracker.step and the report
     (memex/tracking.py), beside the training run's loss curves.
Every step skips the shards an earlier, interrupted audit finished; a round, once written, is
generated as written (memex/plan.py), so a rerun decides nothing anew.
The run folder is the generation run's folder: auditing it again with other filter or match
settings is refused (StageFolder.claim). run.samples_from=<run> re-matches a finished run's
generations in a run folder of its own, skipping steps 3-4 (memex/stages/rematch.py).
"""

from __future__ import annotations

import logging
import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from memex import runner
from memex.config import (
    AuditConfig,
    CandidateSource,
    ConfigError,
    PromptSource,
    adaptive,
    validate_audit,
)
from memex.embed import check_embedder
from memex.layout import RunLayout
from memex.lease import hold
from memex.manifest import ManifestError, arrow_schema, hf_dataset_parts, is_img2dataset_metadata_file, missing_columns
from memex.models import (
    generated_channels,
    model_json,
    native_size,
)
from memex.plan import Round, SamplePlan
from memex.prompts import load_prompts, rank_by_near_duplicates, read_run_prompts
from memex.shards import is_pattern
from memex.storage import check_outside
from memex.tracking import check as check_tracker
from memex.tracking import check_run as check_tracker_run
from memex.tracking import log_audit

log = logging.getLogger("memex.audit")


def run(cfg: AuditConfig, weights: bool = True) -> dict:
    """The whole audit (the numbered steps below); `weights`: generate.prepare's (memex nightly: False)."""
    from memex.membership import NearDuplicates
    from memex.stages import generate, index

    # 1. inputs, each failing in seconds naming the key to fix: config ranges, the model's weights
    # (headers and shapes, no weights read), the training set, the prompts (read now, unless the index ranks them)
    validate_audit(cfg)
    check_tracker(cfg.tracker)  # tracker=mlflow|tensorboard|wandb: its package is installed
    check_tracker_run(cfg.tracker)  # and tracker.run_id a run of its store (one request)
    rematch_of = cfg.run.samples_from  # a re-match (memex/stages/rematch.py) loads no model: none is checked
    same = None  # the model's tokenizer: prompts it reads as one are sampled once
    if rematch_of is None:
        generate.check_model(cfg)
        same = generate.prompt_keys(cfg)
    # a re-match's too: it may set trainset.* (trainset.preprocess among them) apart from its source, and missed
    # the copies of a model trained on squashed pictures (~0.46 tiled l2 for an exact copy). It reads only
    # memex_train.json: a model folder gone since the source was generated leaves nothing to check
    check_trained_shape(cfg)
    prompts = check_shared_inputs(cfg, same)
    if rematch_of is not None:  # its source's prompts and generations; its own run folder, claimed now
        from memex.stages import rematch

        run_name = rematch.prepare(cfg)

    # Ray, and storage every node reaches: a local storage.root on a cluster of several nodes is
    # refused here (storage.shared_mount=true for NFS), before any unit is written to one node's disk
    runner.init(cfg.resources, cfg.storage, cfg.index.root)  # and index.root, where the index units write

    # 2. index (and the prompts it ranks); the run folder records which index it is matched against.
    # A grayscale model's generations are searched among the training images' luma, non-square ones
    # among the training images cut to their aspect first (each an index of its own key)
    luma, aspect = gray_generations(cfg), generation_aspect(cfg)
    info = index.run(cfg, luma=luma, aspect=aspect)
    log.info("index %s: %d training images indexed, %d quarantined", info.key, info.n_indexed, info.n_quarantined)
    if rematch_of is None:
        unmerged = None  # the prompts as read before the tokenizer merged them: a run started then resumes with them
        if prompts is None:
            dups = NearDuplicates(info, cfg.storage.options)  # pages up to prompts.limit, not every training row
            prompts = rank_by_near_duplicates(dups, cfg.prompts.limit, same)
            unmerged = lambda: rank_by_near_duplicates(dups, cfg.prompts.limit)  # noqa: E731
        elif same is not None:
            unmerged = lambda: load_prompts(cfg.prompts, cfg.storage.options, by_text=False)  # noqa: E731
        run_name = generate.prepare(cfg, prompts, weights=weights, unmerged=unmerged)
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    # one audit at a time in a run folder (<run>/_lease.json): a second one refuses, naming this one
    with hold(layout.store, cfg.storage, f"run folder {layout.uri}"):
        # a killed audit's writes to the folder's own files (summary.json, ...): the stage folders sweep theirs
        # (not report/: `memex mia` writes mia.html there under its own lease)
        layout.store.sweep_temp("")
        layout.store.write_json(layout.index_json, info.to_json())
        summary = audit_run_folder(cfg, run_name, layout)
    # 8. the experiment tracker (memex/tracking.py), once the run folder is complete: a failure raises
    # TrackerError naming the tracker and the fix, and loses nothing
    log_audit(cfg, summary, summary.get("report"), run_name)
    return summary


def audit_run_folder(cfg: AuditConfig, run_name: str, layout: RunLayout) -> dict:
    """Steps 3-7 in the prepared run folder (under its lease): triage, generate, filter, match, report."""
    from memex.report import build_report
    from memex.stages import filter as filter_stage
    from memex.stages import match

    # 3. triage, 4. generate (+ match each round), 5. filter, 6. match: inputs from the run folder
    if layout.samples_from is not None:  # a re-match: the source run's triage and generations, as they are
        log.info("re-match: generations of run %s", layout.generated.uri)
    else:
        triage_and_generate(cfg, run_name, layout)
    if cfg.prompts.source != PromptSource.none:
        filter_stage.run(cfg, run_name)
    else:  # one prompt: its N x N graph over every sample is unbounded, and match=all verifies them anyway
        log.info("filter skipped: an unconditional model's samples share one prompt")
    summary = match.run(cfg, run_name)

    # 7. the report (rebuilt every time: cheap, and it picks up report code changes)
    summary["report"] = build_report(layout)
    return summary


def source_index(cfg: AuditConfig) -> dict | None:
    """A re-match's source's index.json (the index its generations were matched against), else None."""
    if cfg.run.samples_from is None:
        return None
    from memex.stages import rematch

    source = rematch.source_layout(cfg)
    return source.store.read_json(source.index_json)


def source_sample_shape(cfg: AuditConfig) -> tuple[int, int, int] | None:
    """(height, width, channels) of a re-match source's first stored generation, or None (no re-match, none
    stored). A `memex generate` source has no index.json: its generations themselves say whether they are
    gray and of which aspect, where the model (moved, a hub id not cached here) may no longer say it."""
    if cfg.run.samples_from is None:
        return None
    import io

    from PIL import Image

    from memex.stages import rematch

    samples = rematch.source_layout(cfg).samples
    done = samples.complete()
    if not done:
        return None
    row = samples.store.read_table(samples.file(done[0]), columns=["height", "width", "image"]).slice(0, 1)
    if not row.num_rows:
        return None
    mode = Image.open(io.BytesIO(row["image"][0].as_py())).mode  # read from the header: no decode
    return row["height"][0].as_py(), row["width"][0].as_py(), 1 if mode in ("L", "I;16", "I") else 3


def generation_aspect(cfg: AuditConfig) -> tuple[int, int] | None:
    """(height, width) of the audit's generations: sampling.height/width, else the model's native size
    (memex/models.py native_size); a re-match's source says which it was matched with, or its stored
    generations do. None: unknown (a hub id not cached here) or square, where the index is the plain one."""
    if (matched := source_index(cfg)) is not None:
        return tuple(matched["aspect"]) if matched.get("aspect") else None
    if (shape := source_sample_shape(cfg)) is not None:
        return None if shape[0] == shape[1] else (shape[0], shape[1])
    s = cfg.sampling
    native = None if s.height and s.width else native_size(cfg.model.path, cfg.model.unet, cfg.model.revision)
    h, w = s.height or (native or (None, None))[0], s.width or (native or (None, None))[1]
    return None if not h or not w or h == w else (h, w)


def gray_generations(cfg: AuditConfig) -> bool:
    """Whether the audit's generations are grayscale: the model's config says so (memex/models.py
    generated_channels); a re-match's source says which index it was matched against (its model may
    be gone). Then the index is built from the training images' luma (memex/stages/index.py)."""
    if (matched := source_index(cfg)) is not None:  # (a `memex generate` source has none: its samples decide)
        return bool(matched.get("luma", False))
    if (shape := source_sample_shape(cfg)) is not None:
        return shape[2] == 1
    return generated_channels(cfg.model.path, cfg.model.unet, cfg.model.revision) == 1


def triage_and_generate(cfg: AuditConfig, run_name: str, layout: RunLayout) -> None:
    """Steps 3-4: triage (when needed before generation), then the generations of every round;
    with match.candidates=all each round's are matched as soon as they exist."""
    from memex.stages import generate, match
    from memex.stages import triage as triage_stage

    first = None  # prompt rows of the first round: every prompt, or the top triage.keep
    # rounds of another budget (another rule, another triage) are refused before the triage stage runs: a fixed
    # audit's rerun over an adaptive one's folder (one default run name) made and scored every preview first,
    # and their cost then counted in the adaptive audit's summary
    plan = SamplePlan.read(layout.store)
    if plan.rounds:  # (its first round's prompts: checked once triage.keep has chosen them)
        rows = plan.rounds[0].prompt_rows
        rows = None if rows is None else list(rows)
        if adaptive(cfg):
            plan.check_budget(layout.store, list(cfg.budget.rounds), rows, "budget.rounds", round_rule(cfg))
        else:
            plan.check_budget(layout.store, [cfg.sampling.samples_per_prompt], rows,
                              "budget=fixed, sampling.samples_per_prompt")
    if triage_stage.needs_stage(cfg):  # else the samples' free first-step scores are the triage (prompt_scores)
        triage_stage.run(cfg, run_name)
        if cfg.triage.keep is not None:
            first = top_by_triage(layout, cfg.triage.keep)
    if adaptive(cfg):
        generate_in_rounds(cfg, run_name, layout, first)
    else:
        # the fixed budget's one round, of the triage.keep prompts if set
        generate.read_plan(cfg, layout, first).check_budget(layout.store, [cfg.sampling.samples_per_prompt], first,
                                                            "budget=fixed, sampling.samples_per_prompt")
        generate.run(cfg, run_name)
        if cfg.match.candidates == CandidateSource.all:
            match.match_shards(cfg, run_name)


def check_shared_inputs(cfg: AuditConfig, same=None) -> pa.Table | None:
    """The inputs every checkpoint audited with one config shares: the training set, where the
    outputs go, the embedder, the prompts (memex nightly checks them once, before any checkpoint:
    each of them failing was one error row per checkpoint, every night). Returns the prompts, or
    None when the index ranks them; `same`: load_prompts'."""
    ranks_captions = cfg.prompts.source == PromptSource.near_duplicates
    rematch = getattr(cfg.run, "samples_from", None) is not None  # its prompts are its source run's
    ranks_captions = ranks_captions and not rematch
    check_trainset(cfg.trainset.path, cfg.storage.options, cfg.trainset.caption_column if ranks_captions else None)
    for key, where in (("storage.root", cfg.storage.root), ("index.root", cfg.index.root)):
        if where:
            check_outside(key, where, "trainset.path", cfg.trainset.path, cfg.storage.options)
    check_embedder(cfg.embedder, cfg.storage.options)  # before an index folder is made for it
    return None if ranks_captions or rematch else load_prompts(cfg.prompts, cfg.storage.options, same)


def check_trainset(path: str, storage_options: dict, caption_column: str | None = None) -> None:
    """trainset.path is readable, cheaply (the index stage lists it all): a manifest's Parquet
    footer opens and has an id and an image or uri column, and `caption_column` when the prompts are
    its captions (else found after the index build); a folder holds an image or a manifest (listed
    until the first one)."""
    import fsspec
    import pyarrow.parquet as pq

    from memex.ingest import IMAGE_SUFFIXES, IngestError, pattern_shards
    from memex.shards import is_hidden

    try:
        fs, root = fsspec.core.url_to_fs(path, **storage_options)
        exists = fs.exists(root)
        is_dir = exists and fs.isdir(root)
    except Exception as e:  # noqa: BLE001 - bad credentials, unknown protocol, endpoint down
        raise ConfigError(f"trainset.path={path} cannot be reached: {type(e).__name__}: {e} "
                          "(check the URI and storage.options)") from e
    if not exists and is_pattern(root):  # shards named by a pattern: each one there (memex/shards.py)
        try:
            pattern_shards(path, fs, root, "trainset.path")
        except IngestError as e:
            raise ConfigError(str(e)) from e
        return
    if not exists:
        raise ConfigError(f"trainset.path={path}: no such file or folder (give a Parquet manifest or an image folder)")
    manifest = None if is_dir else root
    try:  # datasets' save_to_disk: its schema, no rows
        hf = hf_dataset_parts(fs, root, path, "trainset.path") if is_dir else None
    except ManifestError as e:
        raise ConfigError(str(e)) from e
    if hf:
        try:
            names = set(arrow_schema(fs, hf[0]).names)
        except Exception as e:  # noqa: BLE001 - re-raised naming the key
            raise ConfigError(f"trainset.path={path}: {hf[0]} is not readable Arrow: {type(e).__name__}: {e}") from e
        problem = missing_columns(sorted(names), hf=True)
        if problem:
            raise ConfigError(f"trainset.path={path}: the dataset {problem}")
        check_caption_column(path, "dataset", names, caption_column)
        return
    if is_dir:
        found, names, metadata = None, [], None
        for d, _, names in fs.walk(root):
            if is_hidden(d[len(root.rstrip("/")):].lstrip("/")):  # as the listing skips them (.ipynb_checkpoints/)
                continue
            names = [n for n in names if not is_hidden(n)]
            # WebDataset shards first: img2dataset writes a metadata .parquet beside each .tar
            hit = next((f for f in sorted(names) if f.endswith(".tar")), None) or next(
                (f for f in sorted(names) if f.lower().endswith((*IMAGE_SUFFIXES, ".parquet"))), None)
            if hit and hit.endswith(".parquet") and metadata is None and \
                    is_img2dataset_metadata_file(fs, posixpath.join(d, hit)):
                # img2dataset's output_format=files: the images are files in its shard folders
                metadata = posixpath.join(d, hit)
                hit = next((f for f in sorted(names) if f.lower().endswith(IMAGE_SUFFIXES)), None)
            elif hit and hit.endswith(".parquet") and metadata is not None:
                continue  # the next shard's metadata
            if hit:
                found = posixpath.join(d, hit)
                break
        if found is None and metadata is not None:
            names = pq.read_schema(metadata, filesystem=fs).names
            raise ConfigError(f"trainset.path={path}: {metadata} {missing_columns(sorted(names))}")
        if found is None:
            raise ConfigError(f"trainset.path={path}: the folder holds no images ({' '.join(IMAGE_SUFFIXES)}), "
                              "no .tar shards and no .parquet manifest")
        manifest = found if found.endswith(".parquet") else None
        if manifest is None and caption_column is not None and not found.endswith(".tar"):
            check_folder_captions(fs, path, root, found, names, caption_column)
    elif root.endswith(".tar"):  # one WebDataset shard: its members are listed by the index stage
        manifest = None
    elif not root.endswith(".parquet"):
        raise ConfigError(f"trainset.path={path} is a file but not a .parquet manifest or a .tar shard: give a "
                          "Parquet manifest, a folder of images or WebDataset .tar shards")
    if manifest is not None:
        try:
            f = pq.ParquetFile(manifest, filesystem=fs)
        except Exception as e:  # noqa: BLE001 - re-raised naming the key
            raise ConfigError(f"trainset.path={path}: {manifest} is not readable Parquet: "
                              f"{type(e).__name__}: {e}") from e
        names = set(f.schema_arrow.names)
        problem = missing_columns(sorted(names))
        if problem:
            raise ConfigError(f"trainset.path={path}: the manifest {problem}")
        check_caption_column(path, "manifest", names, caption_column)


def check_caption_column(path: str, what: str, names: set[str], caption_column: str | None) -> None:
    if caption_column is not None and caption_column not in names:
        raise ConfigError(f"trainset.path={path}: the {what} has no {caption_column!r} column "
                          f"(trainset.caption_column) to rank as prompts (columns: {sorted(names)}): set "
                          "trainset.caption_column=<column>, or give prompts=file (prompts=none for an "
                          "unconditional model)")


def check_folder_captions(fs, path: str, root: str, first: str, names: list[str], caption_column: str) -> None:
    """An image folder whose captions the audit ranks as prompts has them: a metadata.jsonl /
    metadata.csv (beside the first image, or at the root) with `caption_column`, or <stem>.txt files
    beside the first image. Without, the audit found it after the whole index was built."""
    from memex.ingest import METADATA_FILES, metadata_columns

    here = posixpath.dirname(first)
    metas = [posixpath.join(here, m) for m in METADATA_FILES if m in names]
    if not metas and here != root.rstrip("/"):
        metas = [f for f in (posixpath.join(root, m) for m in METADATA_FILES) if fs.exists(f)]
    if metas:
        columns = metadata_columns(fs, metas[0])
        if caption_column not in columns:
            raise ConfigError(f"trainset.path={path}: {metas[0]} has no {caption_column!r} column "
                              f"(trainset.caption_column) to rank as prompts (columns: {columns}): set "
                              "trainset.caption_column=<column> (diffusers' fine-tuning scripts call it text), or "
                              "give prompts=file")
    elif not any(n.endswith(".txt") for n in names):
        raise ConfigError(f"trainset.path={path}: the image folder has no captions to rank as prompts (no "
                          f"metadata.jsonl or metadata.csv, no <stem>.txt beside {first}): give prompts=file, or "
                          "prompts=none for an unconditional model")


def check_trained_shape(cfg: AuditConfig) -> None:
    """A `memex train` model trained on non-square images squashed them to its square resolution
    (data.resize=true; memex_train.json counts them): its copies are of the squashed pictures, which only
    trainset.preprocess=resize compares with (an exact copy of a 3:2 picture is ~0.46 tiled l2 from its
    centre crop: missed). Any other model, or such a model trained on square images: nothing to check."""
    try:
        info = model_json(cfg.model.path, "memex_train.json") if cfg.model.path else None
    except ImportError:  # a re-match's model.path on a filesystem whose package is not installed here: never loaded
        info = None
    n = info.get("squashed_images") if isinstance(info, dict) else None  # not memex's own file: nothing to go by
    if isinstance(n, int) and n and cfg.trainset.preprocess.value != "resize":
        raise ConfigError(f"model.path={cfg.model.path} was trained by `memex train` on {n} non-square images "
                          f"squashed to its square resolution (data.resize=true, memex_train.json): its copies are "
                          f"of the squashed pictures, which trainset.preprocess={cfg.trainset.preprocess.value} "
                          "does not compare with; set trainset.preprocess=resize")


def top_by_triage(layout: RunLayout, keep: int) -> list[int]:
    """Prompt rows of the `keep` highest triage scores, in prompt order (ties: the earlier prompt)."""
    import numpy as np

    ids = read_run_prompts(layout)["prompt_id"].to_pylist()
    score = {r["prompt_id"]: r["score"] for r in layout.triage.read(columns=["prompt_id", "score"]).to_pylist()
             if r["score"] is not None and np.isfinite(r["score"])}
    # None: a preview with no readable neighbour; NaN: a UNet output that overflowed (fp16): ranked last
    # (a NaN key left sorted's order arbitrary: the lowest scores were kept, the highest dropped)
    best = sorted(range(len(ids)), key=lambda p: (-score.get(ids[p], -np.inf), p))[:keep]
    return sorted(best)


def generate_in_rounds(cfg: AuditConfig, run_name: str, layout: RunLayout, first: list[int] | None = None) -> None:
    """budget=adaptive: round r gives its prompts samples [rounds[r-1], rounds[r]). Round 0 takes
    every prompt (or `first`: the top triage.keep), each later round the previous round's prompts
    that show a sign of memorization. Each round is generated, then matched (every generation:
    match.candidates=all), before the next is decided; a round already written (a resumed audit)
    is generated as written."""
    from memex.stages import generate, match

    s, b = cfg.sampling, cfg.budget
    plan = SamplePlan.read(layout.store)
    # the triage settings too: a resume with triage=none dropped the z-score rule from round 1, with
    # triage=preview added the previews' distances, with other seeds averaged other samples' scores
    rule = round_rule(cfg)
    plan.check_budget(layout.store, list(b.rounds), first, "budget.rounds", rule)
    n_prompts = read_run_prompts(layout).num_rows
    lo = 0
    for r, hi in enumerate(b.rounds):
        if r >= len(plan.rounds):
            rows = first if r == 0 else continuing_prompts(cfg, layout, plan.rounds[-1])
            # a stop is written too (a round of no prompts): a rerun reads it, it never decides again
            plan.add_round(layout.store, rows, n_prompts, lo, hi, s.shard_size, s.batch_size, rule if r else None)
        rnd = plan.rounds[r]
        if not rnd.n_prompts:
            log.info("round %d: no prompt shows a sign of memorization; the budget stops at %d samples", r, lo)
            break
        log.info("round %d: %d prompts x samples [%d, %d)", r, rnd.n_prompts, rnd.lo, rnd.hi)
        generate.run(cfg, run_name)
        match.match_shards(cfg, run_name)
        lo = hi


def round_rule(cfg: AuditConfig) -> dict:
    """The settings that choose a later round's prompts, kept in its file (memex/plan.py Round.rule). The match's
    threshold and distance too: a near miss is continue_factor x match.threshold away (continuing_prompts), and a
    resume after matches/ was deleted to redo it at another threshold (as its refusal advises) kept the rounds
    the old one chose. A round written before they were kept is compared on the keys it holds."""
    b, t, m = cfg.budget, cfg.triage, cfg.match
    return {"continue_factor": b.continue_factor, "continue_triage_z": b.continue_triage_z,
            "triage": getattr(t.kind, "value", t.kind), "triage_seeds": t.seeds, "triage_steps": t.steps,
            "match_threshold": m.threshold, "match_distance": getattr(m.distance, "value", m.distance)}


def continuing_prompts(cfg: AuditConfig, layout: RunLayout, last: Round) -> list[int]:
    """Prompt rows of round `last` that go on: a generation so far, or a triage preview
    (triage=preview), within budget.continue_factor x match.threshold of its nearest training
    picture (a copy or a near miss), or a triage score budget.continue_triage_z robust standard
    deviations above the run's median (docs/method.md#5-budget)."""
    import numpy as np

    from memex.stages.triage import preview_distances, prompt_scores, robust_z

    b, m = cfg.budget, cfg.match
    ids = read_run_prompts(layout)["prompt_id"].to_pylist()
    rows = [last.row(q) for q in range(last.n_prompts)]
    near = layout.matches.read(columns=["prompt_id", "distance"])
    # compared in float32, as match's `within` decides a copy: a copy at exactly the threshold (a uint8
    # case) is extracted, and at continue_factor=1.0 it did not continue (float32 0.15 > float64 0.15)
    limit = np.float32(b.continue_factor * m.threshold)
    close = set(near.filter(pc.less_equal(near["distance"], pa.scalar(limit, pa.float32())))["prompt_id"].to_pylist())
    close |= {pid for pid, d in preview_distances(cfg, layout).items() if np.float32(d) <= limit}
    outlying: set[str] = set()
    scores = prompt_scores(cfg, layout)
    if b.continue_triage_z is not None and scores:
        z = robust_z(np.array(list(scores.values()), dtype=np.float64))
        outlying = {pid for pid, zi in zip(scores, z) if zi >= b.continue_triage_z}
    return [p for p in rows if ids[p] in close or ids[p] in outlying]


def format_summary(s: dict) -> str:
    """A few lines for the terminal: the headline numbers, what they cost and where the evidence is."""
    t = s["thresholds"]
    if s.get("filter", "ran") == "ran":
        filtered = (f"{s['prompts_flagged']} prompts flagged (clique >= {t['min_clique']} at tiled l2 <= "
                    f"{t['filter_edge_tiled_l2']})")
    else:
        filtered = "filter skipped (one unconditional prompt)"
    sampled = s.get("prompts_sampled", s["prompts"])
    of = f"{sampled} of {s['prompts']} prompts" if sampled != s["prompts"] else f"{s['prompts']} prompts"
    which = "generations" if s.get("candidates") == "all" else "clique members"
    lines = [
        f"memex audit: {s['model']['name']} ({s['model']['path']})",
        f"  {s['samples']} samples of {of}; {filtered}",
        f"  {s['extracted_generations']} of {s['candidates_verified']} {which} verified as copies "
        f"({t['match_distance']} <= {t['match_threshold']}): "
        f"{s['extracted_unique_train_images']} unique training images extracted",
    ]
    if "unet_evaluations" in s:
        per = s.get("unet_evaluations_per_extracted_image")
        by = " by the source run" if s.get("samples_from") else ""
        triage = s.get("unet_evaluations_triage", 0)
        lines.append(f"  {s['unet_evaluations']:,} UNet evaluations{by} (triage {triage:,})"
                     + (f", {per:,} per extracted image" if per else ""))
    if s.get("samples_from"):
        lines.append(f"  a re-match of the generations of {s['samples_from']}: no UNet evaluation in this command")
    pictures = s.get("extracted_pictures", [])
    if pictures:
        shown = ", ".join(p["picture"] + (f" (+{len(p['rows']) - 1} copies)" if len(p["rows"]) > 1 else "")
                          for p in sorted(pictures, key=lambda p: p["picture"])[:10])
        lines.append(f"  extracted: {shown}" + (" ..." if len(pictures) > 10 else ""))
    uncounted = s.get("uncounted_pictures", [])
    if uncounted:  # each with its reason (it said "low complexity" for all, and left the others out)
        from memex.report import uncounted_reason

        lines.append(f"  {len(uncounted)} pictures within the threshold but not counted: "
                     + "; ".join(f"{p['picture']} ({uncounted_reason(p, t)})" for p in uncounted[:5])
                     + (" ..." if len(uncounted) > 5 else ""))
    if s.get("prompts_undecided"):
        lines.append(f"  {s['prompts_undecided']} prompts undecided: the clique search ran out of "
                     "filter.max_expansions (raise it to decide them)")
    if s["index"]["quarantined"]:
        lines.append(f"  {s['index']['quarantined']} training images unreadable: "
                     f"see {s['index']['uri']}/quarantine/")
    if s.get("report"):
        lines.append(f"  report: {s['report']}")
    if s.get("tracker"):
        lines.append(f"  tracker: {s['tracker']}")
    lines.append(f"  run folder: {s['run']}")
    return "\n".join(lines)
