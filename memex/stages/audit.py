"""`memex audit`: index -> prompts -> generate -> filter -> match, each step resumable.

  1. check inputs (config ranges, the model folder, the training set) before any cluster work;
  2. index the training set (reused when an earlier audit built the same one); its near-duplicate
     counts rank the captions used as prompts (prompts=near_duplicates, the paper's choice);
  3. generate (memex/stages/generate.py): samples/ in the run folder;
  4. filter: flag prompts whose generations form a clique (candidates/); skipped when
     match.candidates=all (the paper's unconditional setting verifies every sample instead);
  5. match: nearest training images from the sharded index, verified on pixels (matches/);
  6. write the HTML report into report/ (memex/report.py) and print the summary.
Every step skips the shards an earlier, interrupted audit finished.
The run folder is the generation run's folder: auditing the same samples with other filter or
match settings is refused (StageFolder.claim) unless run.name says where the new results go.
"""

from __future__ import annotations

import logging

from memex.config import AuditConfig, CandidateSource, ModelKind, PromptSource, validate_audit
from memex.layout import RunLayout
from memex.models import check_model_inputs
from memex.prompts import load_prompts, rank_by_near_duplicates

log = logging.getLogger("memex.audit")


def run(cfg: AuditConfig) -> dict:
    from memex.membership import read_duplicates
    from memex.report import build_report
    from memex.stages import filter as filter_stage
    from memex.stages import generate, index, match

    # 1. inputs
    validate_audit(cfg)
    check_model_inputs(cfg.model.path, cfg.model.unet)
    if cfg.model.kind == ModelKind.unconditional and cfg.match.candidates == CandidateSource.cliques:
        log.warning("unconditional model with match.candidates=cliques: all samples share one prompt, so the "
                    "filter sees one graph; the paper compares every sample (match=relative)")

    # 2. index (and the prompts it ranks); the run folder records which index it is matched against
    info = index.run(cfg)
    log.info("index %s: %d training images indexed, %d quarantined", info.key, info.n_indexed, info.n_quarantined)
    if cfg.prompts.source == PromptSource.near_duplicates:
        prompts = rank_by_near_duplicates(read_duplicates(info, cfg.storage.options), cfg.prompts.limit)
    else:
        prompts = load_prompts(cfg.prompts, cfg.storage.options)
    run_name = generate.prepare(cfg, prompts)
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    layout.store.write_json(layout.index_json, info.to_json())

    # 3. generate, 4. filter, 5. match: each reads its inputs from the run folder
    generate.run(cfg, run_name)
    if cfg.match.candidates == CandidateSource.cliques:
        filter_stage.run(cfg, run_name)
    else:  # its cliques would not be used, and one prompt's N x N graph over every sample is unbounded
        log.info("filter skipped: match.candidates=all verifies every sample")
    summary = match.run(cfg, run_name)

    # 6. the report (rebuilt every time: cheap, and it picks up report code changes)
    summary["report"] = build_report(layout)
    return summary


def format_summary(s: dict) -> str:
    """A few lines for the terminal: the headline numbers and where the evidence is."""
    t = s["thresholds"]
    if s.get("filter", "ran") == "ran":
        filtered = (f"{s['prompts_flagged']} prompts flagged (clique >= {t['min_clique']} at tiled l2 <= "
                    f"{t['filter_edge_tiled_l2']})")
    else:
        filtered = "filter skipped (match.candidates=all)"
    lines = [
        f"memex audit: {s['model']['name']} ({s['model']['path']})",
        f"  {s['samples']} samples of {s['prompts']} prompts; {filtered}",
        f"  {s['extracted_generations']} of {s['candidates_verified']} candidates verified as copies "
        f"({t['match_distance']} <= {t['match_threshold']}): "
        f"{s['extracted_unique_train_images']} unique training images extracted",
    ]
    pictures = s.get("extracted_pictures", [])
    if pictures:
        shown = ", ".join(p["picture"] + (f" (+{len(p['rows']) - 1} copies)" if len(p["rows"]) > 1 else "")
                          for p in sorted(pictures, key=lambda p: p["picture"])[:10])
        lines.append(f"  extracted: {shown}" + (" ..." if len(pictures) > 10 else ""))
    if s.get("prompts_undecided"):
        lines.append(f"  {s['prompts_undecided']} prompts undecided: the clique search ran out of "
                     "filter.max_expansions (raise it to decide them)")
    if s["index"]["quarantined"]:
        lines.append(f"  {s['index']['quarantined']} training images unreadable: "
                     f"see {s['index']['uri']}/shards/quarantine-*.parquet")
    if s.get("report"):
        lines.append(f"  report: {s['report']}")
    lines.append(f"  run folder: {s['run']}")
    return "\n".join(lines)
