"""Which verified generations make a picture count as extracted (memex/stages/match.py count_pictures)."""

import pyarrow as pa
import pytest

from memex.config import MatchConfig
from memex.layout import MATCHES_SCHEMA
from memex.stages.match import count_pictures


def _ext(rows):
    base = {"prompt_id": "p", "prompt": "x", "train_caption": "c", "distance": 0.1, "embed_distance": 0.1,
            "neighbor_rank": 0, "extracted": True}
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=MATCHES_SCHEMA)


ROWS = [  # picture 1: detailed, one generation; picture 5 (rows 5 and 6): low complexity, two; picture 9: low, one
    {"sample_id": "a/0", "train_gid": 1, "train_id": "t1", "train_detail": 0.3},
    {"sample_id": "b/0", "train_gid": 5, "train_id": "t5", "train_detail": 0.1},
    {"sample_id": "b/1", "train_gid": 6, "train_id": "t6", "train_detail": 0.1},
    {"sample_id": "c/0", "train_gid": 9, "train_id": "t9", "train_detail": 0.05},
]


def test_low_complexity_pictures_need_more_generations_or_a_clique():
    picture = {6: 5}  # rows 5 and 6 are one picture stored twice
    got = count_pictures(_ext(ROWS), picture, set(), MatchConfig())
    assert set(got) == {1, 5, 9}
    assert got[1]["counted"] and not got[1]["low_complexity"]
    assert got[5]["generations"] == 2 and got[5]["low_complexity"] and got[5]["counted"]
    assert got[9]["low_complexity"] and not got[9]["counted"]  # one close generation of a flat picture
    # the same generation inside a flagged clique is evidence enough
    assert count_pictures(_ext(ROWS), picture, {"c/0"}, MatchConfig())[9]["counted"]
    # so is one closer to the picture than the picture's own tile mosaic (0.04 < detail 0.05): an
    # exact copy of a flat picture reproduces its detail, not only its tile colours
    exact = [dict(r, distance=0.04) if r["train_gid"] == 9 else r for r in ROWS]
    assert count_pictures(_ext(exact), picture, set(), MatchConfig())[9]["counted"]


@pytest.mark.parametrize("min_generations,counted", [(1, {1, 5}), (2, {5}), (3, set())])
def test_min_generations_applies_to_every_picture(min_generations, counted):
    m = MatchConfig(min_generations=min_generations, low_detail_min_generations=2)
    got = count_pictures(_ext(ROWS), {6: 5}, set(), m)
    assert {p for p, e in got.items() if e["counted"]} == counted


def test_relative_l2_has_no_low_complexity_rule():
    """Relative l2 already divides by the distances to the picture's neighbours: a flat picture
    close to everything gets a large denominator, so no second rule applies."""
    got = count_pictures(_ext(ROWS), {}, set(), MatchConfig(distance="relative_l2", threshold=1.0))
    assert not any(e["low_complexity"] for e in got.values()) and all(e["counted"] for e in got.values())


def test_triage_keep_takes_the_top_scores_in_prompt_order(tmp_path):
    from memex.layout import TRIAGE_SCHEMA, RunLayout
    from memex.stages.audit import top_by_triage
    from memex.stages.triage import robust_z

    layout = RunLayout(str(tmp_path), "r")
    ids = [f"p{i}" for i in range(6)]
    layout.store.write_table(layout.prompts_path, pa.table({"prompt_id": ids, "prompt": ids}))
    scores = [0.1, 0.9, 0.3, 0.9, 0.05, 0.5]
    layout.triage.write_shard(0, pa.table({"prompt_id": ids, "prompt": ids, "score": scores,
                                           "unet_evaluations": [8] * 6}, schema=TRIAGE_SCHEMA))
    assert top_by_triage(layout, 3) == [1, 3, 5]  # 0.9, 0.9 (tie: earlier first), 0.5; returned in row order
    assert top_by_triage(layout, 10) == list(range(6))
    z = robust_z(pa.array(scores).to_numpy())
    assert z[1] == z[3] and z[1] > z[5] > z[0] and abs(sorted(z)[2] + sorted(z)[3]) < 1e-9  # centred on the median
