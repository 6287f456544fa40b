"""The brute-force truth's generations (bench/memorization.py): what every recall and precision claim
in bench/RESULTS.md is scored against."""

import importlib.util
import sys
from pathlib import Path

from memex.prompts import prompt_id
from memex.sampling import sample_seed

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_truth_script(name: str = "memorization"):
    sys.path.insert(0, str(BENCH))  # its sibling imports (timing, ...) resolve as when run from bench/
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
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


def test_split_half_ceiling_scores_the_first_half_against_labels_of_the_second(capsys):
    """bench/triage_variants.py ceiling: a prompt that copies in both halves is ranked by its first
    half and labelled by its second; one whose first half came close but whose second copies nothing
    counts against the score."""
    def rows(pid, dists, copies):  # one truth row per sample: tiled l2 to the nearest picture, copy flag
        return [{"prompt_id": pid, "sample_index": i, "tiled_l2": d, "copy": c, "nearest_id": f"pic-{pid}"}
                for i, (d, c) in enumerate(zip(dists, copies))]
    t = (rows("a", [0.1, 0.3, 0.1, 0.12], [True, False, True, True])  # copies in both halves
         + rows("b", [0.05, 0.4, 0.5, 0.4], [True, False, False, False])  # closest first half, then nothing
         + rows("c", [0.5, 0.6, 0.5, 0.6], [False] * 4)
         + rows("d", [0.45, 0.5, 0.14, 0.5], [False, False, True, False]))  # copies only in its second half
    tv = load_truth_script("triage_variants")
    tv.ceiling(tv.labels(t)[1])
    out = capsys.readouterr().out
    # positives (second half memorizes): a (score -0.1), d (-0.45); negatives: b (-0.05), c (-0.5)
    # pairs ranked right: a>c, d>c; wrong: a<b, d<b -> AUC 0.5; reproduce: only a (two copies of pic-a)
    assert "AUC memorize 0.500 (2 prompts), reproduce 0.667 (1 prompts)" in out
    assert "first half does) = 0.50, | first half does not = 0.50" in out


def test_a_copy_is_the_nearest_picture_by_both_distances_within_both_limits():
    """bench/memorization.py's copy label, on hand-made distances (3 pictures): the standard every
    recall and precision figure of bench/RESULTS.md is scored by."""
    import torch

    m = load_truth_script()
    rms = torch.tensor([[0.30, 0.05, 0.40],   # nearest 1 by both, within both: a copy of 1
                        [0.08, 0.20, 0.09],   # nearest 0 by RMS, 2 by tiled l2: no copy
                        [0.12, 0.50, 0.60],   # RMS 0.12 > 0.1
                        [0.50, 0.60, 0.02]])  # tiled l2 0.16 > 0.15
    tiled = torch.tensor([[0.40, 0.10, 0.50],
                          [0.14, 0.30, 0.12],
                          [0.10, 0.60, 0.70],
                          [0.60, 0.70, 0.16]])
    is_copy, (rms_d, rms_k), (tiled_d, tiled_k) = m.copy_labels(rms, tiled)
    assert is_copy.tolist() == [True, False, False, False]
    assert rms_k.tolist() == [1, 0, 0, 2] and tiled_k.tolist() == [1, 2, 0, 2]
    assert m.copy_labels(rms, tiled, copy_rms=0.15)[0].tolist() == [True, False, True, False]


def test_truth_sets_and_the_score_of_an_audit(tmp_path):
    """bench/audit_vs_truth.py: reproduced = copied by >= 2 pool generations; recall over those;
    precision counts a reported picture as emitted when the pool copies it at all or the audit's own
    generation copies it; strict only the latter. Fractions worked out by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def row(pic, rms, tiled, tiled_id=None):
        return {"nearest_id": pic, "nearest_rms": rms, "tiled_id": tiled_id or pic, "tiled_l2": tiled}

    pool = [row("A", 0.05, 0.1), row("A", 0.02, 0.05), row("A", 0.09, 0.14),  # A: 3 copies
            row("B", 0.05, 0.1),  # B: once
            row("C", 0.05, 0.1), row("C", 0.05, 0.1, tiled_id="A"),  # C: once (the second is nearest A by tiled)
            row("D", 0.05, 0.1), row("D", 0.05, 0.1),  # D: twice
            row("E", 0.11, 0.1), row("E", 0.05, 0.2)]  # E: never (RMS, then tiled l2, too far)
    path = tmp_path / "truth.parquet"
    pq.write_table(pa.Table.from_pylist(pool), path)
    avt = load_truth_script("audit_vs_truth")
    reproduced, once, n = avt.truth_sets(str(path))
    assert (dict(reproduced), dict(once), n) == ({"A": 3, "D": 2}, {"B": 1, "C": 1}, 10)

    # the audit reports A (its own generation a copy), B (emitted: the pool copies it once, the audit's is
    # looser) and X (neither: a false alarm); it misses D
    found, ok = {"A", "B", "X"}, {"A": True, "B": False, "X": False}
    recall, strict_recall, precision, strict, hit, emitted = avt.score(found, ok, set(reproduced), set(once))
    assert (recall, strict_recall, precision, strict) == (1 / 2, 1 / 2, 2 / 3, 1 / 3)
    assert hit == {"A"} and emitted == {"A", "B"}
    # strict recall credits a reproduced picture only on the audit's own evidence: A found on a looser copy
    assert avt.score(found, {**ok, "A": False}, set(reproduced), set(once))[:2] == (1 / 2, 0.0)


def test_stop_when_found_gives_a_found_prompt_s_samples_to_the_others():
    """bench/copy_rates.py: prompt q1 copies picture A at every sample, q2 copies B at 1 in 20. With
    48 samples in rounds of 8, q1 stops after its first round and q2 takes the other 40: B is found
    with probability 1 - 0.95^40 = 0.87 (0.71 had q2 kept only half the budget)."""
    mod = load_truth_script("copy_rates")
    rates = {"A": {"q1": (10, 10)}, "B": {"q2": (1, 20)}}
    recall, every = mod.stop_when_found(rates, ["q1", "q2"], ["A", "B"], budget=48, step=8, trials=4000)
    assert abs(every - (1 - 0.95 ** 40)) < 0.03, every
    assert abs(recall - (1 + every) / 2) < 1e-9  # A is always found


def test_count_sweep_applies_min_generations_to_the_summary_s_pictures():
    """bench/count_sweep.py: at g >= low_detail_min_generations a picture counts when it is distinct and
    has g copying generations; at g = 1 the summary's own count (its clique and "closer" routes for a
    low-complexity picture) stands; a look-alike (not distinct) never counts."""
    mod = load_truth_script("count_sweep")
    pic = lambda name, gens, **kw: {"picture": name, "generations": gens, "distinct": True, **kw}  # noqa: E731
    summary = {"thresholds": {"min_generations": 1, "low_detail_min_generations": 2},
               "extracted_pictures": [pic("a", 1), pic("b", 3), pic("c", 2), pic("flat-in-clique", 1,
                                                                                  low_complexity=True)],
               "uncounted_pictures": [pic("flat", 1, low_complexity=True), pic("generic", 4, distinct=False)]}
    assert mod.counted_at(summary, 1) == {"a", "b", "c", "flat-in-clique"}
    assert mod.counted_at(summary, 2) == {"b", "c"}
    assert mod.counted_at(summary, 3) == {"b"}
