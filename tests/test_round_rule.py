"""budget=adaptive chooses a later round's prompts by budget.continue_factor x match.threshold (a near miss) in
match.distance: the round's file keeps the threshold and the distance with the rest of its rule. It kept
neither: a resume after matches/ was deleted to redo it at another threshold (as the stage's refusal advises)
kept the rounds the old threshold chose, unrefused."""
import pyarrow as pa
import pytest

from memex.layout import RunLayout
from memex.plan import SamplePlan
from memex.storage import StorageError


def test_a_resume_at_another_match_threshold_is_refused_by_the_rounds_rule(tmp_path, monkeypatch):
    from memex.stages import audit, generate, match

    from conftest import compose

    monkeypatch.setattr(generate, "run", lambda cfg, name: None)
    monkeypatch.setattr(match, "match_shards", lambda cfg, name: None)
    monkeypatch.setattr(audit, "read_run_prompts", lambda layout: pa.table({"prompt_id": ["a", "b", "c"]}))
    decided = []
    monkeypatch.setattr(audit, "continuing_prompts", lambda cfg, layout, last: decided.append(last.index) or [1])
    base = [f"storage.root={tmp_path}", "model.path=/planted", "triage=none", "budget=adaptive",
            "budget.rounds=[4,16]", "sampling.samples_per_prompt=16"]
    layout = RunLayout(str(tmp_path), "r")
    audit.generate_in_rounds(compose(base + ["match.threshold=0.15"], config_name="audit"), "r", layout)
    assert decided == [0] and SamplePlan.read(layout.store).rounds[1].rule["match_threshold"] == 0.15
    audit.generate_in_rounds(compose(base + ["match.threshold=0.15"], config_name="audit"), "r", layout)
    assert decided == [0]  # the same rule: the round is read, not decided again
    with pytest.raises(StorageError, match=r"round 1, whose prompts were chosen with other settings "
                                           r"\(match_threshold: was 0.15, now 0.25\)"):
        audit.generate_in_rounds(compose(base + ["match.threshold=0.25"], config_name="audit"), "r", layout)
    with pytest.raises(StorageError, match=r"match_distance: was 'tiled_l2', now 'relative_l2'"):
        audit.generate_in_rounds(compose(base + ["match=relative"], config_name="audit"), "r", layout)
    assert decided == [0] and [r.prompt_rows for r in SamplePlan.read(layout.store).rounds][1] == (1,)
