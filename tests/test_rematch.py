"""`memex audit run.samples_from=<run>`: a finished run's generations matched again with other settings.

A tiny text model's prompt A has 8 generations; the training set holds exact copies of generations
0-3 and copies of 4-7 with pixel noise of +-24/255 (RMS ~0.05, tiled l2 well under 0.15, over
0.02), beside 20 unrelated blocky pictures. Expected by construction: at match.threshold=0.15 all 8
pictures are extracted, at 0.02 only the 4 exact copies. The re-match at 0.02 must equal a fresh
audit at 0.02 (which generates anew) table for table, generate nothing and leave its source as it
was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex.config import ConfigError
from memex.images import encode_png
from memex.layout import RunLayout
from memex.storage import StorageError

from conftest import blocky, compose

PROMPTS = ["apple pie", "blue lighthouse", "cat on a mat"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_models):
    """The training set, the audit's overrides, and the finished source audit at threshold 0.15."""
    from memex.config import SamplingConfig
    from memex.models import load_model
    from memex.prompts import prompt_id
    from memex.sampling import Sampler, sample_seed
    from memex.stages import audit

    tmp = tmp_path_factory.mktemp("rematch")
    model = tiny_models["pixel_text"]
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    a = prompt_id(PROMPTS[0])
    gens = Sampler(load_model(model), SamplingConfig(num_inference_steps=3, guidance_scale=3.0, batch_size=4)).generate(
        [a] * 8, [PROMPTS[0]] * 8, [sample_seed(0, a, i) for i in range(8)])
    rng = np.random.default_rng(7)
    noisy = [np.clip(g.astype(int) + rng.integers(-24, 25, g.shape), 0, 255).astype(np.uint8) for g in gens[4:]]
    others = [blocky(rng, 16) for _ in range(20)]
    manifest = tmp / "train.parquet"
    pq.write_table(pa.table({"id": [f"a-{i}" for i in range(8)] + [f"o-{j:02d}" for j in range(20)],
                             "image": [encode_png(x) for x in [*gens[:4], *noisy, *others]],
                             "caption": [PROMPTS[0]] * 8 + [f"other {j}" for j in range(20)]}), manifest)
    overrides = ["model=local", f"model.path={model}", "prompts=file", f"prompts.path={tmp / 'prompts.txt'}",
                 "trainset=manifest", f"trainset.path={manifest}", "sampling.samples_per_prompt=8",
                 "sampling.num_inference_steps=3", "sampling.guidance_scale=3.0", "sampling.batch_size=4",
                 "sampling.shard_size=4", "index.shards=2", "embedder.size=16", "filter.min_clique=2",
                 "resources.executor=local"]
    s = audit.run(compose([*overrides, f"storage.root={tmp / 'runs'}", "run.name=src"], config_name="audit"))
    return tmp, overrides, s


def _audit(overrides: list[str]) -> dict:
    from memex.stages import audit

    return audit.run(compose(overrides, config_name="audit"))


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rematch_at_another_threshold_equals_a_fresh_audit_and_generates_nothing(source):
    tmp, overrides, src = source
    assert {p["picture"] for p in src["extracted_pictures"]} == {f"a-{i}" for i in range(8)}
    runs = tmp / "runs"
    before = _files(runs / "src")

    s = _audit([*overrides, f"storage.root={runs}", "run.samples_from=src", "match.threshold=0.02"])
    layout = RunLayout.at(s["run"])
    assert layout.run_name.startswith("src-m") and layout.samples_from == "src"
    assert {p["picture"] for p in s["extracted_pictures"]} == {f"a-{i}" for i in range(4)}
    assert s["samples_from"] == str(runs / "src") and s["thresholds"]["match_threshold"] == 0.02
    # nothing generated: its folder holds no generation of its own, the source is byte for byte as it was
    own = {p.name for p in Path(layout.path).iterdir()}
    assert not own & {"samples", "triage", "previews", "rounds", "prompts.parquet"}, own
    assert {"candidates", "matches", "summary.json", "report", "run.json", "index.json"} <= own
    assert _files(runs / "src") == before
    assert s["unet_evaluations"] == src["unet_evaluations"] and s["samples"] == src["samples"] == 24

    # the same audit generated anew at 0.02 (another storage.root) leaves the same tables and summary
    fresh = _audit([*overrides, f"storage.root={tmp / 'fresh'}", "match.threshold=0.02"])
    other = RunLayout.at(fresh["run"])
    for name in ("candidates", "matches"):
        got, want = (getattr(x, name).read() for x in (layout, other))
        assert got.num_rows == want.num_rows > 0 and got.sort_by(got.column_names[0]).equals(
            want.sort_by(want.column_names[0])), name
    drop = {"run", "index", "config", "report", "samples_from"}
    assert {k: v for k, v in s.items() if k not in drop} == {k: v for k, v in fresh.items() if k not in drop}
    page = (Path(layout.path) / "report" / "index.html").read_text()
    assert "A re-match of the generations of run" in page
    assert page.count("data:image/png") == (Path(other.path) / "report" / "index.html").read_text().count(
        "data:image/png") > 0  # the extracted generations' images, read from the source's samples

    # a rerun resumes (same result); a re-match of the re-match is one of the source
    again = _audit([*overrides, f"storage.root={runs}", "run.samples_from=src", "match.threshold=0.02"])
    assert {k: v for k, v in again.items() if k != "report"} == {k: v for k, v in s.items() if k != "report"}
    from memex.stages import audit

    chained = _audit([*overrides, f"storage.root={runs}", f"run.samples_from={layout.run_name}",
                      "match.threshold=0.15", "run.name=chained"])
    assert RunLayout.at(chained["run"]).samples_from == "src" and chained["samples_from"] == str(runs / "src")
    assert chained["extracted_pictures"] == src["extracted_pictures"]
    assert "a re-match of the generations of" in audit.format_summary(chained)
    assert _files(runs / "src") == before


def test_a_rematch_refuses_what_it_cannot_take_as_it_is(source, tmp_path):
    from memex.lease import Lease
    from memex.stages.rematch import prepare

    tmp, overrides, _ = source
    runs = tmp / "runs"

    def cfg(*extra):
        return compose([*overrides, f"storage.root={runs}", *extra], config_name="audit")

    with pytest.raises(ConfigError, match=r"run.samples_from=nope: .*nope is not a run folder \(no run.json\)"):
        prepare(cfg("run.samples_from=nope"))
    # the path memex audit printed (`run folder: ...`) names the same run; one outside storage.root is refused
    assert prepare(cfg(f"run.samples_from={runs / 'src'}/", "run.name=by-path")) == "by-path"
    assert RunLayout(str(runs), "by-path").samples_from == "src"
    with pytest.raises(ConfigError, match=rf"run.samples_from={tmp_path}/src is not in storage.root={runs}: .*set "
                                          rf"storage.root={tmp_path}$"):
        prepare(cfg(f"run.samples_from={tmp_path / 'src'}"))
    # other generation settings: every key named, nothing written
    with pytest.raises(ConfigError, match=r"made with other settings \(sampling.num_inference_steps: was 3, now 4; "
                                          r"sampling.seed: was 0, now 1\)"):
        prepare(cfg("run.samples_from=src", "sampling.num_inference_steps=4", "sampling.seed=1", "run.name=x"))
    with pytest.raises(ConfigError, match=r"budget.kind: was 'fixed', now 'adaptive'"):
        prepare(cfg("run.samples_from=src", "budget=adaptive", "budget.rounds=[2,8]", "run.name=x"))
    assert not (runs / "x").exists()
    # an audit at work in the source
    with Lease(RunLayout(str(runs), "src").store, "run folder src"):
        with pytest.raises(ConfigError, match=r"an audit works in .*src now \(host .* pid"):
            prepare(cfg("run.samples_from=src"))
    # a source that has not finished: its summary gone (an interrupted audit)
    unfinished = tmp_path / "runs"
    unfinished.mkdir()
    shutil.copytree(runs / "src", unfinished / "half")
    (unfinished / "half" / "summary.json").unlink()
    with pytest.raises(ConfigError, match=r"half has not finished its audit \(no summary.json\): run the command"):
        prepare(compose([*overrides, f"storage.root={unfinished}", "run.samples_from=half"], config_name="audit"))
    # a source written before a section existed is compared on what it recorded: no budget, no refusal
    shutil.copytree(runs / "src", unfinished / "older")
    summary = json.loads((unfinished / "older" / "summary.json").read_text())
    del summary["config"]["budget"]
    (unfinished / "older" / "summary.json").write_text(json.dumps(summary))
    assert prepare(compose([*overrides, f"storage.root={unfinished}", "run.samples_from=older", "budget=adaptive",
                            "budget.rounds=[2,8]"], config_name="audit")).startswith("older-m")


def test_run_samples_from_is_an_audit_key_only(tiny_models):
    """memex generate has no run.samples_from (the schema refuses it), and memex nightly refuses it:
    it generates anew for every checkpoint."""
    from memex.config import validate_nightly

    with pytest.raises(Exception, match=r"samples_from"):
        compose(["run.samples_from=src"], config_name="generate")
    with pytest.raises(ConfigError, match=r"run.samples_from: memex nightly generates anew"):
        validate_nightly(compose(["run.samples_from=src"], config_name="nightly"))


def test_a_rematch_folder_is_not_a_generation_folder(source, tmp_path):
    """A re-match's run.name naming a folder with generations of its own, or its source, is refused;
    so is `memex generate run.name=<a re-match>`, by the re-match's run.json (samples_from). Nothing
    is written."""
    from memex.config import validate_audit
    from memex.stages import generate
    from memex.stages.rematch import prepare

    tmp, overrides, _ = source
    runs = tmp / "runs"
    other = tmp_path / "runs"  # two finished runs: src2 re-matched into src's folder
    for name in ("src", "src2"):
        shutil.copytree(runs / "src", other / name)
    before = _files(other / "src")
    with pytest.raises(ConfigError, match=r"run.name=src: .*src holds generations of its own"):
        prepare(compose([*overrides, f"storage.root={other}", "run.samples_from=src2", "run.name=src"],
                        config_name="audit"))
    assert _files(other / "src") == before
    with pytest.raises(ConfigError, match=r"run.name=src is run.samples_from itself"):
        validate_audit(compose([*overrides, f"storage.root={runs}", "run.samples_from=src", "run.name=src"],
                               config_name="audit"))

    s = _audit([*overrides, f"storage.root={runs}", "run.samples_from=src", "match.threshold=0.05", "run.name=m05"])
    before = _files(Path(RunLayout.at(s["run"]).path))
    gen = [o for o in overrides if not o.startswith(("trainset", "index", "embedder", "filter"))]
    with pytest.raises(StorageError, match=r"other settings \(samples_from: was 'src', now None; source_generations: "):
        generate.prepare(compose([*gen, f"storage.root={runs}", "run.name=m05"]))
    assert _files(runs / "m05") == before


def test_a_rematch_on_s3_reads_its_source_in_the_bucket(source, s3_server, bucket):
    """storage=s3 (moto): the finished source copied into the bucket is re-matched there; the
    generations are read from s3://<bucket>/runs/src, the re-match's folder is its own, the source's
    objects are unchanged, and the pictures are the local re-match's."""
    import s3fs

    tmp, overrides, _ = source
    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(str(tmp / "runs" / "src"), f"{bucket}/runs/src", recursive=True)
    before = {p: fs.info(p)["ETag"] for p in fs.find(f"{bucket}/runs/src")}
    url = s3_server["client_kwargs"]["endpoint_url"]
    s3 = ["storage=s3", f"storage.root=s3://{bucket}/runs", "+storage.options.key=testing",
          "+storage.options.secret=testing", f"storage.options.client_kwargs.endpoint_url={url}"]
    s = _audit([*overrides, *s3, f"run.samples_from=s3://{bucket}/runs/src", "match.threshold=0.02",
                "run.name=s3-t0.02"])
    assert s["samples_from"] == f"s3://{bucket}/runs/src" and s["run"] == f"s3://{bucket}/runs/s3-t0.02"
    assert {p["picture"] for p in s["extracted_pictures"]} == {f"a-{i}" for i in range(4)}
    assert {p: fs.info(p)["ETag"] for p in fs.find(f"{bucket}/runs/src")} == before
    own = {p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/runs/s3-t0.02")}
    assert "samples" not in own and {"matches", "summary.json", "report"} <= own


def test_the_report_of_a_rematch_whose_source_is_gone_names_it(source, tmp_path):
    """memex report on a re-match whose source run folder was deleted: the generations it shows are
    gone, and the error says so, naming that folder; the re-match's own files are left as they were."""
    from memex.report import build_report

    tmp, overrides, _ = source
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs" / "src", runs / "src")
    s = _audit([*overrides, f"storage.root={runs}", "run.samples_from=src", "match.threshold=0.02", "run.name=m"])
    assert build_report(s["run"]).endswith("report/index.html")  # rebuilt from the two folders
    shutil.rmtree(runs / "src")
    before = _files(runs / "m")
    with pytest.raises(StorageError, match=r"re-matched the generations of .*runs/src, and they are gone .*restore "
                                           r"that run folder"):
        build_report(s["run"])
    assert _files(runs / "m") == before


def test_a_rematch_with_another_embedder_builds_its_own_index(source):
    """A re-match with another embedder setting (pixels at 8 px, not 16) proposes neighbours from an
    index of its own, then verifies on pixels as before: the source's pictures, another index key."""
    tmp, overrides, src = source
    s = _audit([*overrides, f"storage.root={tmp / 'runs'}", "run.samples_from=src", "embedder.size=8",
                "run.name=e8"])
    assert s["index"]["key"] != src["index"]["key"] and s["config"]["embedder"]["size"] == 8
    assert [p["picture"] for p in s["extracted_pictures"]] == [p["picture"] for p in src["extracted_pictures"]]


def test_a_rematch_compares_model_and_sampling_exactly(source, tmp_path):
    """run.json leaves a key out at its default (model.lora, sampling.channels_last): a key on one
    side only is a difference, as it is for a resume, not a key to skip. A LoRA source re-matched
    without it (or the reverse) is refused, naming the key."""
    from memex.stages.rematch import prepare

    tmp, overrides, _ = source
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs" / "src", runs / "src")
    with pytest.raises(ConfigError, match=r"sampling.channels_last: was None, now True"):
        prepare(compose([*overrides, f"storage.root={runs}", "run.samples_from=src", "sampling.channels_last=true"],
                        config_name="audit"))
    settings = json.loads((runs / "src" / "run.json").read_text())
    settings["model"]["lora"] = "/loras/checkpoint-500"
    (runs / "src" / "run.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=r"model.lora: was '/loras/checkpoint-500', now None"):
        prepare(compose([*overrides, f"storage.root={runs}", "run.samples_from=src"], config_name="audit"))
    assert sorted(p.name for p in runs.iterdir()) == ["src"]


def test_a_rematch_refuses_a_source_whose_generations_are_gone(source, tmp_path):
    """A finished audit whose samples/ (or a shard of it, prompts.parquet, a round's plan) was removed to
    save space: refused before any work, naming what is missing in the source, not the re-match's folder."""
    from memex.stages.rematch import prepare

    tmp, overrides, _ = source
    runs = tmp_path / "runs"
    # rounds/: which samples each prompt has (without it the filter found none and flagged nothing, silently)
    for name, gone in (("no-shard", "samples/shard-000001.parquet"), ("no-prompts", "prompts.parquet"),
                       ("no-samples", "samples"), ("no-rounds", "rounds/round-000.json")):
        shutil.copytree(tmp / "runs" / "src", runs / name)
        target = runs / name / gone
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(ConfigError, match=rf"{name} is finished, and its generations are not all there "
                                              rf"\(missing: {'samples/_SUCCESS.json' if name == 'no-samples' else gone}"
                                              r"\)\. A re-match reads them where they were made: restore"):
            prepare(compose([*overrides, f"storage.root={runs}", f"run.samples_from={name}"], config_name="audit"))
    assert not [p for p in runs.iterdir() if "-m" in p.name]


def test_a_rematch_refuses_a_source_copied_without_the_triage_it_paid_for(source, tmp_path):
    """A source whose summary counts triage UNet evaluations (triage=noise_norm or preview: a stage of
    its own), copied without triage/: the re-match's UNet evaluations left that cost out and its
    per-prompt triage scores went blank, without a word. Refused, naming triage/_SUCCESS.json."""
    from memex.stages.rematch import prepare

    tmp, overrides, _ = source
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs" / "src", runs / "paid")
    summary = json.loads((runs / "paid" / "summary.json").read_text())
    (runs / "paid" / "summary.json").write_text(json.dumps({**summary, "unet_evaluations_triage": 960}))
    shutil.rmtree(runs / "paid" / "triage", ignore_errors=True)
    with pytest.raises(ConfigError, match=r"paid is finished, and its generations are not all there "
                                          r"\(missing: triage/_SUCCESS.json\)"):
        prepare(compose([*overrides, f"storage.root={runs}", "run.samples_from=paid"], config_name="audit"))
    assert not [p for p in runs.iterdir() if "-m" in p.name]


def test_a_rematch_folder_of_a_source_generated_again_is_refused(source, tmp_path):
    """The source deleted and audited again into the same folder with an adaptive budget (the same
    run.json: model, sampling and prompts), then the sweep rerun with that budget: the old re-match
    folder holds matches of the old generations, and resuming it returned them. Its run.json pins
    the source's rows, so it is refused, naming them, and left as it was."""
    tmp, overrides, _ = source
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs" / "src", runs / "src")
    _audit([*overrides, f"storage.root={runs}", "run.samples_from=src", "match.threshold=0.02", "run.name=m"])
    before = _files(runs / "m")
    shutil.rmtree(runs / "src")
    adaptive = ["budget=adaptive", "budget.rounds=[2,8]"]
    s = _audit([*overrides, f"storage.root={runs}", "run.name=src", *adaptive])
    assert s["samples"] < 24
    with pytest.raises(StorageError, match=rf"run folder .*m was written with other settings \("
                                           rf"source_generations.rounds: was 1, now 2; source_generations.rows: was 24,"
                                           rf" now {s['samples']}; .*for src generated again since, use another "
                                           r"run.name"):
        _audit([*overrides, f"storage.root={runs}", "run.samples_from=src", "match.threshold=0.02", "run.name=m",
                *adaptive])
    assert _files(runs / "m") == before
    fresh = _audit([*overrides, f"storage.root={runs}", "run.samples_from=src", "match.threshold=0.02",
                    "run.name=m2", *adaptive])
    assert fresh["samples"] == s["samples"]


def test_a_rematch_of_a_memex_generate_run(source, tmp_path):
    """A `memex generate` run (no audit, no summary) re-matched: its generations matched to the
    training set as an audit's are; a budget or triage selection it never had is refused, and a
    re-match folder that has not finished is named as one by memex report."""
    from memex.report import build_report
    from memex.stages import generate
    from memex.stages.rematch import prepare

    tmp, overrides, src = source
    runs = tmp_path / "runs"
    gen = [o for o in overrides if not o.startswith(("trainset", "index", "embedder", "filter"))]
    g = compose([*gen, f"storage.root={runs}", "run.name=gen"])
    generate.run(g, generate.prepare(g))
    s = _audit([*overrides, f"storage.root={runs}", "run.samples_from=gen", "run.name=g15"])
    assert [p["picture"] for p in s["extracted_pictures"]] == [p["picture"] for p in src["extracted_pictures"]]
    assert s["unet_evaluations"] == src["unet_evaluations"] and s["samples_from"] == str(runs / "gen")
    for extra, says in ((["budget=adaptive", "budget.rounds=[2,8]"], "budget=adaptive: set budget=fixed"),
                        (["triage.keep=2"], "triage.keep: drop it"),
                        (["triage=preview"], "triage=preview: set triage=auto")):
        with pytest.raises(ConfigError, match=rf"run.samples_from=gen is a `memex generate` run: .*this command says "
                                              rf"{says}"):
            prepare(compose([*overrides, f"storage.root={runs}", "run.samples_from=gen", "run.name=x", *extra],
                            config_name="audit"))
    assert not (runs / "x").exists()
    prepare(compose([*overrides, f"storage.root={runs}", "run.samples_from=gen", "run.name=half"],
                    config_name="audit"))
    with pytest.raises(StorageError, match=r"half is a re-match of gen that has not finished \(no summary.json\)"):
        build_report(str(runs / "half"))


def test_a_rematch_is_named_alike_from_any_checkout(monkeypatch):
    """The re-match folder's name hashed the demo trainset's absolute path (${memex_home:} resolved), so
    the same sweep from a laptop's checkout and from its copy in a Ray job's working_dir made two
    folders and matched twice. The path is hashed as the variable now, as nightly's config hash does."""
    from dataclasses import replace

    import memex.config
    import memex.stages.rematch as rematch
    from memex.config import MEMEX_HOME

    from conftest import compose

    cfg = compose(["run.samples_from=src"], config_name="audit")
    assert cfg.trainset.path.startswith(MEMEX_HOME)
    here = rematch.rematch_name(cfg, "src")
    elsewhere = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_1234"
    moved = replace(cfg, trainset=replace(cfg.trainset, path=cfg.trainset.path.replace(MEMEX_HOME, elsewhere)))
    monkeypatch.setattr(memex.config, "MEMEX_HOME", elsewhere)
    assert rematch.rematch_name(moved, "src") == here
    other = replace(cfg, match=replace(cfg.match, threshold=0.1))
    assert rematch.rematch_name(other, "src") != here  # a setting still names its own folder
