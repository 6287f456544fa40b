"""A threshold sweep over one audit: re-matching its generations (run.samples_from) against generating
anew for each value (what `memex audit -m match.threshold=...` did before), side by side in one process.

    python bench/bench_rematch.py [--prompts 12] [--samples 16] [--thresholds 0.1 0.2]

1. the source: the demo audit (shipped model and training set, local Ray) at its defaults, but
   --prompts prompts x --samples samples;
2. per threshold, a re-match of the source's generations (run.samples_from) and the same audit
   generated anew in a run folder of its own (run.name), on the same index (built once, reused).
Prints each one's wall time and UNet evaluations, the ratio, and checks that both found the same
pictures (the generations are seeded: generating anew makes the same pixels).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from memex import cli

    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base=None):
        return cli.to_audit_config(hydra_compose(config_name="audit", overrides=overrides))


def timed_audit(overrides: list[str]) -> tuple[dict, float]:
    from memex.stages import audit

    t0 = time.perf_counter()
    s = audit.run(compose(overrides))
    return s, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--root", default=None, help="storage.root (default: a temporary folder)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = a.root or tempfile.mkdtemp(prefix="bench-rematch-")
    base = [f"storage.root={root}", f"prompts.limit={a.prompts}", f"sampling.samples_per_prompt={a.samples}"]

    src, t_src = timed_audit([*base, "run.name=source"])  # the index is built here, and reused below
    print(f"source audit (index + generate + match): {t_src:6.1f} s, {src['unet_evaluations']:,} UNet evaluations, "
          f"{src['extracted_unique_train_images']} pictures at {src['thresholds']['match_threshold']}")
    print(f"{'threshold':>9} {'re-match s':>10} {'anew s':>8} {'ratio':>6} {'anew UNet evals':>15} {'pictures':>8}")
    for t in a.thresholds:
        re, t_re = timed_audit([*base, "run.samples_from=source", f"run.name=re-{t}", f"match.threshold={t}"])
        new, t_new = timed_audit([*base, f"run.name=anew-{t}", f"match.threshold={t}"])
        same = [x["picture"] for x in re["extracted_pictures"]] == [x["picture"] for x in new["extracted_pictures"]]
        if not same:
            raise SystemExit(f"threshold {t}: the re-match and the new audit disagree: "
                             f"{re['extracted_pictures']} vs {new['extracted_pictures']}")
        print(f"{t:>9} {t_re:>10.1f} {t_new:>8.1f} {t_new / t_re:>5.1f}x {new['unet_evaluations']:>15,} "
              f"{re['extracted_unique_train_images']:>8}")
    print(f"storage.root: {root}")


if __name__ == "__main__":
    main()
