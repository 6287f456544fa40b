"""The brute-force truth's generations (bench/memorization.py): what every recall and precision claim
in bench/RESULTS.md is scored against."""

import importlib.util
import sys
from pathlib import Path

from memex.prompts import prompt_id
from memex.sampling import sample_seed

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_truth_script():
    sys.path.insert(0, str(BENCH))  # its sibling imports (timing, ...) resolve as when run from bench/
    try:
        spec = importlib.util.spec_from_file_location("bench_memorization", BENCH / "memorization.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_a_caption_that_several_pictures_share_never_runs_the_same_seed_twice():
    # the demo's captions are compositional: 240 distinct for 256 pictures, one shared by 3
    captions = ["a red star logo", "a blue bars logo", "a red star logo", "a red star logo"]
    target, texts, pids, index = load_truth_script().prompted(captions, samples=4)
    seeds = [sample_seed(0, p, i) for p, i in zip(pids, index)]
    assert len(seeds) == 16 and len(set(seeds)) == 16  # before: 3 x the same 4 seeds, 8 duplicates
    assert target == [k for k in range(4) for _ in range(4)] and texts[8] == "a red star logo"
    star = [i for p, i in zip(pids, index) if p == prompt_id("a red star logo")]
    assert star == list(range(12))  # sample j of the prompt is sample j of an audit of that prompt
    assert [i for p, i in zip(pids, index) if p == prompt_id("a blue bars logo")] == [0, 1, 2, 3]
