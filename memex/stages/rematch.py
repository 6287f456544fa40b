"""Re-matching: a finished run's generations filtered and matched again with other settings, no UNet call.

    memex audit run.samples_from=demo-342d6d154f match.threshold=0.1
    memex audit -m run.samples_from=demo-342d6d154f 'run.name=demo-t${match.threshold}' match.threshold=0.1,0.15

A run folder is named by its generation settings, so an audit at another match or filter setting
reaches the same folder, which refuses it (StageFolder.claim), and a sweep without this generated
every value anew: 38,400 UNet evaluations each on the demo, 500 x 50 x 2 = 50,000 a prompt on Stable
Diffusion (51,000 with PNDM's warm-up step).
A re-match writes a run folder of its own whose run.json is the source's plus `samples_from`; its
prompts, rounds, triage, previews and samples are read from the source where they are
(`RunLayout.generated`) and never written, and its candidates/, matches/, summary.json and report
are its own. Its summary's UNet evaluations are the source's: what the generations it matched cost.

    prepare(cfg) -> run name   1. the source: a finished run folder (summary.json, or a `memex
                                  generate` run's complete samples/), no audit working in it, its
                                  prompts.parquet and every samples shard still there;
                               2. what made its generations (model.*, sampling.* exactly; an audit's
                                  prompts, budget and triage too; a `memex generate` run's: one
                                  fixed round, no triage selection) equal to this command's, or
                                  refused naming each key that differs: the summary and report
                                  state this command's config (but for WORK_SPLITTING_KEYS, which
                                  change no generation; paths in the checkout, the demo's, compared
                                  as ${memex_home:}, as from another checkout they differ);
                               3. the run folder: run.name, or <source>-m<hash of the settings a
                                  re-match changes>; its run.json claimed with the source's rows,
                                  shards and rounds (a rerun resumes; another source, or the source
                                  generated again since with other settings, is refused, and so is
                                  `memex report` of the folder: check_source_unchanged).
Everything else (the index, filter, match, report) is the audit's own code on that folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath

import memex.config as config
from memex.config import (
    AuditConfig,
    BudgetKind,
    ConfigError,
    PromptSource,
    TriageKind,
    drop_unset_added,
    identity_text,
    plain,
)
from memex.layout import SAMPLES_FROM, SOURCE_GENERATIONS, RunLayout
from memex.lease import hold, live_holder
from memex.plan import SamplePlan
from memex.redact import redact
from memex.storage import StorageError, as_recorded, differences_text

log = logging.getLogger("memex.rematch")

# config sections a re-match changes (they name its default run folder); every other section that
# decides generations must be the source's (GENERATION_SECTIONS), the rest (storage, resources,
# tracker, run) say where and how it runs
REMATCH_SECTIONS = ("filter", "match", "embedder", "index", "trainset")
# decided the source's generations: compared with its summary.json's config (model and sampling
# with its run.json, which a `memex generate` run has too)
GENERATION_SECTIONS = ("prompts", "budget", "triage")
# keys of the compared sections that only cut the generations into units of work, or encode them: at one
# sampling.batch_size a row's pixels do not depend on its batch neighbours or position (memex/sampling.py), a
# sample's seed on neither (sample_seed), and PNG is lossless at any zlib level. A re-match runs none of that
# work, so other values (a cluster's own triage.prompts_per_task) are no reason to refuse it. Not
# sampling.decode_batch_size: it moves a few pixels by 1 of 255 (other conv batch shapes)
WORK_SPLITTING_KEYS = (("sampling", "shard_size"), ("sampling", "png_compress_level"), ("triage", "prompts_per_task"))
# identity_text's spelling of the checkout's folder
MEMEX_HOME_VAR = "${memex_home:}"


def _json(obj) -> object:
    return json.loads(json.dumps(obj, default=str))


def source_name(cfg: AuditConfig) -> str:
    """run.samples_from as a run folder's name: a name as it is, or a path or URI (the `run folder:`
    line memex audit prints) of a folder in storage.root. A re-match reads its source and writes its
    own folder under one storage.root; a folder elsewhere is refused, naming the root to set."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    given = cfg.run.samples_from.rstrip("/")
    if "/" not in given:
        return given
    opts = cfg.storage.options
    try:
        fs_root, root = fsspec.core.url_to_fs(cfg.storage.root, **opts)
        fs_src, path = fsspec.core.url_to_fs(given, **opts)
    except Exception as e:  # noqa: BLE001 - an unknown protocol: named with the key
        raise ConfigError(f"run.samples_from={given}: {type(e).__name__}: {e}") from e
    parent, name = posixpath.split(path.rstrip("/"))
    if fs_src.protocol != fs_root.protocol or parent != root.rstrip("/"):
        where = parent if isinstance(fs_src, LocalFileSystem) else fs_src.unstrip_protocol(parent)
        raise ConfigError(f"run.samples_from={given} is not in storage.root={cfg.storage.root}: a re-match writes "
                          f"its run folder beside its source; set storage.root={where}")
    return name


def source_layout(cfg: AuditConfig, src: str | None = None) -> RunLayout:
    """Step 1: the run folder run.samples_from (or `src`) names, finished and not being written; a
    re-match's own source when that is itself a re-match (its generations are that run's)."""
    src = src or source_name(cfg)
    layout = RunLayout(cfg.storage.root, src, cfg.storage.options)
    settings = layout.store.read_json(layout.run_json)
    if settings is None:
        raise ConfigError(f"run.samples_from={src}: {layout.uri} is not a run folder (no run.json): give the name of "
                          f"a finished audit's run folder under storage.root={cfg.storage.root} (memex audit "
                          "prints it: run folder: ...)")
    if settings.get(SAMPLES_FROM):  # a re-match of a re-match: the generations are the first source's
        return source_layout(cfg, settings[SAMPLES_FROM])
    holder = live_holder(layout.store, cfg.storage, f"run folder {layout.uri}")
    if holder is not None:
        raise ConfigError(f"run.samples_from={src}: an audit works in {layout.uri} now ({holder}); re-match it "
                          "once that audit has finished")
    audited = layout.store.exists(layout.index_json)
    if (layout.read_summary() if audited else layout.samples.success()) is None:
        raise ConfigError(f"run.samples_from={src}: {layout.uri} has not finished its "
                          f"{'audit (no summary.json)' if audited else 'generation (no samples/_SUCCESS.json)'}: "
                          "run the command that started it again (it resumes), then re-match it")
    gone = missing_generations(layout)
    if gone:  # removed to save space, or a partial copy: a re-match reads them, it never writes them
        raise ConfigError(f"run.samples_from={src}: {layout.uri} is finished, and its generations are not all there "
                          f"(missing: {', '.join(gone[:5])}{', ...' if len(gone) > 5 else ''}). A re-match reads them "
                          "where they were made: restore that run folder, or leave out run.samples_from to generate "
                          "anew")
    return layout


def missing_generations(layout: RunLayout) -> list[str]:
    """What a re-match reads of its source and the source lacks: prompts.parquet, samples/'s
    _SUCCESS.json and each shard it counts (a glob each: one LIST on S3, not a request per shard)."""
    done = layout.samples.success()
    if done is None:
        return ["samples/_SUCCESS.json"]
    gone = [] if layout.store.exists(layout.prompts_path) else ["prompts.parquet"]
    folder = layout.samples
    marked = folder.complete()
    files = {posixpath.basename(f) for f in folder.store.fs.glob(posixpath.join(folder.path, "shard-*.parquet"))}
    gone += [f"samples/{posixpath.basename(folder.file(i))}" for i in marked
             if posixpath.basename(folder.file(i)) not in files]
    if len(marked) < done.get("shards", 0):
        gone.append(f"samples/_markers ({len(marked)} of {done['shards']} shards marked)")
    # the rounds say which samples each prompt has: without them the filter found 0 samples a prompt and
    # flagged none, and summary.json said 0 prompts sampled, without a word
    rounds = {posixpath.basename(f) for f in layout.store.fs.glob(posixpath.join(layout.store.join("rounds"),
                                                                                  "round-*.json"))}
    gone += [f"rounds/{posixpath.basename(p)}" for p in (SamplePlan.path(layout.store, r)
                                                         for r in range(done.get("rounds", 1)))
             if posixpath.basename(p) not in rounds]
    # the triage the source paid for: without it the re-match's UNet evaluations left its cost out and its
    # per-prompt triage scores went blank, without a word
    summary = layout.read_summary() or {}
    if summary.get("unet_evaluations_triage") and layout.triage.success() is None:
        gone.append("triage/_SUCCESS.json")
    return gone


def source_generations(layout: RunLayout) -> dict:
    """What the source's generations are, from samples/_SUCCESS.json (its timings left out): claimed
    in the re-match's run.json, so a re-match folder of a source generated again since, with other
    settings, is refused instead of resumed with its old matches."""
    done = layout.samples.success() or {}
    return {k: done[k] for k in ("rows", "shards", "rounds", "unet_evaluations") if k in done}


def check_same_generations(cfg: AuditConfig, source: RunLayout) -> None:
    """Step 2: model.* and sampling.* equal to the source's run.json, and an audit's prompts.*,
    budget.* and triage.* to its summary's config (WORK_SPLITTING_KEYS left out, each side's checkout
    written as ${memex_home:}); else one refusal naming every key that differs."""
    from memex.stages.generate import model_and_sampling

    run_json = source.store.read_json(source.run_json)
    # exactly as a resume compares them (Store.claim): run.json leaves a later key out at its
    # default, so a key one side lacks is a difference (a LoRA on one side only)
    now = _json(redact(model_and_sampling(cfg)))
    was = {k: run_json.get(k) for k in now}
    summary = source.read_summary()
    if summary is not None:  # sections a source written before one existed lacks: compared on what it has
        mine, theirs = _json(redact(plain(cfg))), summary.get("config", {})
        shared = _shared({k: theirs[k] for k in GENERATION_SECTIONS if k in theirs},
                         {k: mine[k] for k in GENERATION_SECTIONS})
        was.update(shared[0])
        now.update(shared[1])
    else:  # a `memex generate` run: one fixed round for every prompt; whether it had prompts decides the filter
        if cfg.budget.kind != BudgetKind.fixed or cfg.triage.keep is not None or cfg.triage.kind == TriageKind.preview:
            key = ("budget=adaptive: set budget=fixed" if cfg.budget.kind != BudgetKind.fixed else
                   "triage.keep: drop it" if cfg.triage.keep is not None else "triage=preview: set triage=auto")
            raise ConfigError(f"run.samples_from={cfg.run.samples_from} is a `memex generate` run: every prompt had "
                              f"one fixed round, no prompt selected or previewed by triage, and this command says "
                              f"{key}")
        from memex.prompts import UNCONDITIONAL_ID, read_run_prompts

        ids = read_run_prompts(source)["prompt_id"].to_pylist()
        if (ids == [UNCONDITIONAL_ID]) != (cfg.prompts.source == PromptSource.none):
            raise ConfigError(f"run.samples_from={cfg.run.samples_from}: its generations are "
                              f"{'an unconditional model' if ids == [UNCONDITIONAL_ID] else 'prompted'}, and this "
                              f"command says prompts={cfg.prompts.source.value}: set "
                              f"{'prompts=none' if ids == [UNCONDITIONAL_ID] else 'the prompts it was generated with'}")
    for section, key in WORK_SPLITTING_KEYS:
        for side in (was, now):
            if isinstance(side.get(section), dict):
                side[section].pop(key, None)
    detail = differences_text(*_checkout_free(was, now), limit=8)
    if detail:
        raise ConfigError(f"run.samples_from={cfg.run.samples_from}: its generations were made with other settings "
                          f"({detail}). A re-match takes them as they were made: give the source's values (or drop "
                          "those overrides), or leave out run.samples_from to generate anew")


def _checkout_free(was: dict, now: dict) -> tuple[dict, dict]:
    """Both sides as identity_text writes them, the checkout's folder as ${memex_home:}: the demo's
    model.path and prompts.path lie in it, and a source audited from a laptop's checkout recorded them
    resolved there, so its re-match from the copy in a Ray job's working_dir was refused over model.path.
    The source's checkout is read off its paths: where this command's value is <MEMEX_HOME>/<rel> and the
    source's <folder>/<rel>, that folder (one for all such keys, else none is taken)."""
    home, theirs = config.MEMEX_HOME, set()
    for key, n in _leaves(now):
        w = _at(was, key)
        if isinstance(n, str) and n.startswith(home + "/") and isinstance(w, str) and w != n:
            rel = n[len(home):]
            if len(w) > len(rel) and w.endswith(rel):
                theirs.add(w[:-len(rel)])
    if len(theirs) == 1:  # as JSON spells it, as identity_text replaces MEMEX_HOME in JSON text
        was = json.loads(json.dumps(was).replace(json.dumps(theirs.pop())[1:-1], MEMEX_HOME_VAR))
    return json.loads(identity_text(was)), json.loads(identity_text(now))


def _leaves(d: dict, key: tuple = ()):
    """(key path, value) of each value that is no dict, at every depth."""
    for k, v in d.items():
        yield from _leaves(v, (*key, k)) if isinstance(v, dict) else [((*key, k), v)]


def _at(d: object, key: tuple) -> object:
    """The value at a key path, or None where a level is missing."""
    for k in key:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _shared(was: dict, now: dict) -> tuple[dict, dict]:
    """The keys both hold, at every depth: a source written before a key existed (or after one went)
    is compared on what it recorded."""
    keys = [k for k in was if k in now]
    pairs = {k: _shared(was[k], now[k]) if isinstance(was[k], dict) and isinstance(now[k], dict) else (was[k], now[k])
             for k in keys}
    return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}


def rematch_name(cfg: AuditConfig, source: str) -> str:
    """<source>-m<10 hex of the settings a re-match changes>: one folder per threshold of a sweep."""
    mine = drop_unset_added(_json(redact(plain(cfg))))  # a later key, unset: the folders keep their names
    h = hashlib.sha256(identity_text({k: mine[k] for k in REMATCH_SECTIONS}).encode()).hexdigest()
    return f"{source}-m{h[:10]}"


def rematch_settings(source: RunLayout) -> dict:
    """A re-match folder's run.json: its source's, the source named (samples_from) and its generations'
    rows, shards and rounds pinned (source_generations), as run.json records them."""
    return as_recorded({**(source.store.read_json(source.run_json) or {}), SAMPLES_FROM: source.run_name,
                        SOURCE_GENERATIONS: source_generations(source)})


def check_source_unchanged(layout: RunLayout) -> None:
    """A re-match folder's source still holds the generations it matched: its run.json and samples/ as
    rematch_settings recorded them, else StorageError naming what changed (the source deleted and
    generated again under its name, with other settings: the report showed the new generations beside
    the old matches). A folder written before source_generations was pinned is compared on the rest."""
    recorded = layout.store.read_json(layout.run_json) or {}
    source = RunLayout(layout.root, layout.samples_from, layout.store.options)
    now = rematch_settings(source)
    if SOURCE_GENERATIONS not in recorded:
        now.pop(SOURCE_GENERATIONS)
    if now != recorded:
        raise StorageError(f"{layout.uri} re-matched the generations of {source.uri}, and that run folder was "
                           f"generated again since, with other settings ({differences_text(recorded, now, limit=8)}):"
                           f" this folder's matches are of the old generations. Nothing was changed. Re-match it "
                           f"again under another run.name (or delete {layout.uri} and rerun its command), or "
                           "restore the source as it was")


def prepare(cfg: AuditConfig) -> str:
    """Steps 1-3: check the source, claim the re-match's run folder; returns its name. Writes
    nothing in the source; no model is loaded (the checkpoint may be gone)."""
    source = source_layout(cfg)
    check_same_generations(cfg, source)
    name = cfg.run.name or rematch_name(cfg, source.run_name)
    layout = RunLayout(cfg.storage.root, name, cfg.storage.options)
    existing = layout.store.read_json(layout.run_json)
    if existing is not None and not existing.get(SAMPLES_FROM):
        raise ConfigError(f"run.name={name}: {layout.uri} holds generations of its own; a re-match writes a run "
                          "folder of its own: give another run.name (or leave it out)")
    layout.store.check_writable("run folder", "storage.root (bucket name, folder permissions) and "
                                "storage.options (endpoint_url, credentials)")
    settings = rematch_settings(source)
    with hold(layout.store, cfg.storage, f"run folder {layout.uri}"):  # claim reads, then writes: one job at a time
        layout.store.claim(layout.run_json, settings, f"run folder {layout.uri}",
                           f"A re-match folder holds the matches of one source's generations: for another source, "
                           f"or for {source.run_name} generated again since, use another run.name (or delete "
                           f"{layout.uri}).")
    log.info("re-match of %s: its prompts, rounds and %d samples; no UNet evaluation here", source.uri,
             settings[SOURCE_GENERATIONS].get("rows", 0))
    return name
