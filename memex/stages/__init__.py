"""Stages: each one a module with the same contract.

    run(cfg, run_name) -> dict     triage, generate, filter, match (and every stage to come)
        reads its inputs from the run folder (memex/layout.py RunLayout), writes <run>/<stage>/
        as numbered units through memex/runner.py (markers: memex/storage.py StageFolder), then
        <stage>/_SUCCESS.json with the summary it returns. A rerun skips complete units.
    index.run(cfg) -> IndexInfo    the one stage keyed by content, not by run: its folder
        <index root>/<key>/ is shared by every audit of the same training data and settings.

`generate.prepare(cfg, prompts)` claims a run folder (run.json, prompts.parquet) and names it;
generate produces the rounds written in rounds/ (memex/plan.py; one fixed round when none is), and
`match.match_shards` matches the samples shards done so far, so an adaptive audit interleaves
them; `audit` and `nightly` chain the stages. Hydra stops at memex/cli.py: stages take typed configs.
"""
