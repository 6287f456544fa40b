"""Re-matches (run.samples_from) after review: the trained-shape check, the report of a re-match whose
source was generated again, a source from another checkout, and the keys that only split the work.

The `source` fixture is tests/test_rematch.py's: a tiny text model's finished audit (8 generations of
prompt A, the training set holding copies of them), run here once for this module.
"""

from __future__ import annotations

import json
import shutil

import pytest
from test_rematch import _audit, _files, source  # noqa: F401 - source: the fixture, shared

from memex.config import ConfigError
from memex.storage import StorageError

from conftest import compose


def test_a_rematch_of_a_model_trained_on_squashed_pictures_needs_resize(source, tmp_path):  # noqa: F811
    """check_trained_shape ran only when the audit generated, and a re-match may set trainset.* apart from its
    source: trainset.preprocess=center_crop on a `memex train` model trained on squashed non-square pictures
    missed their copies (~0.46 tiled l2 for an exact one) without a word. Refused before any work now; a
    model folder gone since the source was generated leaves nothing to check."""
    tmp, overrides, _ = source
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs" / "src", runs / "src")
    model = tmp_path / "squashed"
    shutil.copytree(next(o for o in overrides if o.startswith("model.path=")).split("=", 1)[1], model)
    (model / "memex_train.json").write_text(json.dumps({"squashed_images": 5}))
    settings = json.loads((runs / "src" / "run.json").read_text())  # the source generated with that model
    settings["model"]["path"] = str(model)
    (runs / "src" / "run.json").write_text(json.dumps(settings))
    here = [*[o for o in overrides if not o.startswith("model.path=")], f"model.path={model}",
            f"storage.root={runs}", "run.samples_from=src"]
    with pytest.raises(ConfigError, match=r"trained by `memex train` on 5 non-square images .*"
                                          r"trainset.preprocess=center_crop does not compare with; set "
                                          r"trainset.preprocess=resize"):
        _audit([*here, "run.name=crop"])
    assert not (runs / "crop").exists()
    assert _audit([*here, "trainset.preprocess=resize", "run.name=resize"])["config"]["trainset"]["preprocess"] \
        == "resize"
    shutil.rmtree(model)  # a re-match loads no model: one deleted since is nothing to check
    assert _audit([*here, "run.name=gone"])["samples_from"] == str(runs / "src")


def test_the_report_of_a_rematch_whose_source_was_generated_again_is_refused(source, tmp_path):  # noqa: F811
    """The source run folder deleted and audited again under its name with another seed: memex report of
    the re-match checked only that samples/_SUCCESS.json was there, and showed the new generations beside
    the old matches. The source's run.json and rows are compared with what the re-match recorded (as a
    rerun of it is, rematch.prepare), and the report refused, naming the setting; the folder left as it was."""
    from memex.report import build_report

    tmp, overrides, _ = source
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs" / "src", runs / "src")
    s = _audit([*overrides, f"storage.root={runs}", "run.samples_from=src", "match.threshold=0.02", "run.name=m"])
    run_json = runs / "m" / "run.json"
    pinned = run_json.read_text()
    older = {k: v for k, v in json.loads(pinned).items() if k != "source_generations"}
    run_json.write_text(json.dumps(older))  # a re-match written before the rows were pinned: compared on the rest
    assert build_report(s["run"]).endswith("report/index.html")
    run_json.write_text(pinned)
    shutil.rmtree(runs / "src")
    _audit([*overrides, f"storage.root={runs}", "run.name=src", "sampling.seed=1"])
    before = _files(runs / "m")
    with pytest.raises(StorageError, match=r"m re-matched the generations of .*runs/src, and that run folder was "
                                           r"generated again since, with other settings \(sampling.seed: was 0, now "
                                           r"1\): .*Re-match it again under another run.name"):
        build_report(s["run"])
    assert _files(runs / "m") == before


def test_a_rematch_from_another_checkout_of_the_same_source(source, tmp_path, monkeypatch):  # noqa: F811
    """The demo's model.path and prompts.path are ${memex_home:} paths: a source audited from a laptop's
    checkout recorded them resolved there, and its re-match from the copy in a Ray job's working_dir was
    refused ("model.path: was '/a/...', now '/b/...'"). Both sides are compared with their checkout written
    as ${memex_home:} now; a path that differs past the checkout is still refused."""
    import memex.config
    from memex.stages.rematch import prepare

    tmp, overrides, _ = source
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs" / "src", runs / "src")
    laptop, job = tmp_path / "laptop", tmp_path / "ray" / "working_dir_files" / "_ray_pkg_1234"
    (job / "demo").mkdir(parents=True)
    shutil.copy(tmp / "prompts.txt", job / "demo" / "prompts.txt")
    settings = json.loads((runs / "src" / "run.json").read_text())
    settings["model"]["path"] = f"{laptop}/demo/models/demo-text"
    (runs / "src" / "run.json").write_text(json.dumps(settings))
    summary = json.loads((runs / "src" / "summary.json").read_text())
    summary["config"]["prompts"]["path"] = f"{laptop}/demo/prompts.txt"
    (runs / "src" / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(memex.config, "MEMEX_HOME", str(job))
    here = [o for o in overrides if not o.startswith(("model.path=", "prompts.path="))]

    def cfg(model: str, *extra):
        return compose([*here, f"model.path={job}/demo/models/{model}", f"prompts.path={job}/demo/prompts.txt",
                        f"storage.root={runs}", "run.samples_from=src", *extra], config_name="audit")

    assert prepare(cfg("demo-text")).startswith("src-m")
    with pytest.raises(ConfigError, match=r"model.path: was '\$\{memex_home:\}/demo/models/demo-text', now "
                                          r"'\$\{memex_home:\}/demo/models/demo-other'"):
        prepare(cfg("demo-other", "run.name=x"))
    assert not (runs / "x").exists()


def test_a_rematch_takes_other_work_splitting_settings(source, tmp_path):  # noqa: F811
    """triage.prompts_per_task, sampling.shard_size and sampling.png_compress_level cut the generations into
    units of work or encode them, and change no pixel or seed (at one batch_size a row does not depend on
    its batch neighbours, memex/sampling.py; PNG is lossless): a re-match was refused over them. Not
    sampling.decode_batch_size, which moves pixels: still refused."""
    from memex.stages.rematch import prepare

    tmp, overrides, _ = source
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs" / "src", runs / "src")

    def cfg(*extra):
        return compose([*overrides, f"storage.root={runs}", "run.samples_from=src", *extra], config_name="audit")

    assert prepare(cfg("triage.prompts_per_task=8", "sampling.shard_size=8", "sampling.png_compress_level=6",
                       "run.name=split")) == "split"
    with pytest.raises(ConfigError, match=r"made with other settings \(sampling.decode_batch_size: was None, "
                                          r"now 2\)"):
        prepare(cfg("sampling.decode_batch_size=2", "triage.prompts_per_task=8", "run.name=x"))
    assert not (runs / "x").exists()
