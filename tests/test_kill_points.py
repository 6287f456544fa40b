"""Kill points: `memex audit` killed with SIGKILL in the index, the generate, the match and the
filter stage (one storage root, killed four times, each time rerun with the same command) and
finally run to the end leaves exactly what an uninterrupted audit leaves; training ids that look
like paths stay data; a storage root in a bucket that does not exist fails, naming it, and
creates no bucket.

The audit is a tiny pixel_text model (memex/tiny.py) on 6 prompts x 4 samples against a planted
training set of 26 rows (4 exact copies of prompt 0's generations, a duplicate, a corrupt row),
sized so that each stage has several units: 6 index shards, 6 filter chunks (one prompt each), 6
samples shards (6 match units). The uninterrupted reference audit runs once per module, with
resources.executor=local (no Ray), so the comparison also shows the two executors agree.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from memex.images import encode_png

from conftest import BIN, blocky, compose

N_PROMPTS, N_SAMPLES = 6, 4
PROMPTS = [f"prompt number {i}" for i in range(N_PROMPTS)]
RUN = "k"
# steps, guidance and batch as in the audit below: the planted copies are its own generations.
# 20 steps: a generation unit takes ~0.5 s, so units are still left when the actor, which keeps
# working through the units it has queued until Ray reaps the dead driver's job, is gone
STEPS, GUIDANCE, BATCH = 20, 3.0, 4




def _generations(model: str, prompt: str, n: int) -> list[np.ndarray]:
    """The audit's generations 0..n-1 of `prompt` (seeded per sample: memex/sampling.py)."""
    from memex.config import SamplingConfig
    from memex.models import load_model
    from memex.prompts import prompt_id
    from memex.sampling import Sampler, sample_seed

    pid = prompt_id(prompt)
    sampler = Sampler(load_model(model), SamplingConfig(num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                                        batch_size=BATCH))
    return list(sampler.generate([pid] * n, [prompt] * n, [sample_seed(0, pid, i) for i in range(n)]))


@dataclass
class World:
    model: str
    prompts: Path
    manifest: Path
    logs: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models) -> World:
    d = tmp_path_factory.mktemp("kill-world")
    model = tiny_models["pixel_text"]
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    copies = _generations(model, PROMPTS[0], N_SAMPLES)
    rng = np.random.default_rng(7)
    others = [blocky(rng, 16) for _ in range(20)]
    ids = [f"copy-{i}" for i in range(N_SAMPLES)] + [f"other-{j:02d}" for j in range(20)] + ["copy-0#dup", "broken"]
    images = ([encode_png(c) for c in copies] + [encode_png(o) for o in others] + [encode_png(copies[0])]
              + [b"\x89PNG\r\n\x1a\n truncated"])
    pq.write_table(pa.table({"id": ids, "image": images, "caption": [f"caption {i}" for i in ids]}),
                   d / "train.parquet")
    return World(model, d / "prompts.txt", d / "train.parquet", d / "logs")


def _audit_cmd(world: World, root: Path, address: str | None) -> list[str]:
    where = f"resources.address={address}" if address else "resources.executor=local"
    return [str(BIN / "memex"), "audit", "model=local", f"model.path={world.model}", "prompts=file",
            f"prompts.path={world.prompts}", "trainset=manifest", f"trainset.path={world.manifest}",
            f"storage.root={root}", f"run.name={RUN}", "triage=none", f"sampling.samples_per_prompt={N_SAMPLES}",
            f"sampling.num_inference_steps={STEPS}", f"sampling.guidance_scale={GUIDANCE}",
            f"sampling.batch_size={BATCH}", f"sampling.shard_size={BATCH}", f"index.shards={UNITS}", "embedder.size=16",
            "filter.min_clique=2", "filter.prompts_per_task=1", where]


def _env(world: World) -> dict:
    return {**os.environ, "MEMEX_LOG_DIR": str(world.logs)}


def _run_to_completion(world: World, root: Path, address: str | None) -> subprocess.CompletedProcess:
    r = subprocess.run(_audit_cmd(world, root, address), capture_output=True, text=True, timeout=400,
                       env=_env(world), cwd=root.parent)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


@pytest.fixture(scope="module")
def clean(world, tmp_path_factory) -> Path:
    """The uninterrupted audit every killed one is compared with, run with resources.executor=local
    (every unit in the command's own process, no Ray): the killed audits on Ray must end with the
    same files, so this also checks that the two executors agree."""
    root = tmp_path_factory.mktemp("clean") / "runs"
    t0 = time.perf_counter()
    r = _run_to_completion(world, root, None)
    print(f"clean audit: {time.perf_counter() - t0:.1f}s")
    assert "run folder:" in r.stdout
    return root


# ---- comparing two storage roots ---------------------------------------------------------------
# what one command did, not what it produced: how long a unit or stage took (markers, _SUCCESS.json),
# how many shards this invocation generated (samples/_SUCCESS.json, rewritten by every rerun)
# and how: the node a unit ran on, the executor (the reference audit runs with resources.executor=local)
VOLATILE_KEYS = {"seconds", "generated_shards", "node_id", "resources"}
REPORT_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC")  # the report's "generated" line
REPORT_RESOURCES = re.compile(r"&quot;resources&quot;: \{[^{}]*\}")  # the config the report shows: the executor


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _leftover(rel: Path) -> bool:
    """What a killed process may leave behind and readers skip: temp files, a lease; logs/ differ anyway."""
    return "logs" in rel.parts or rel.name.startswith("_tmp-") or rel.name == "_lease.json"


def snapshot(root: Path) -> dict[str, object]:
    """Every file under a storage root: bytes, JSON (paths as <root>, timings dropped) or the report
    (its time dropped), keyed by relative path."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or _leftover(rel):
            continue
        if p.suffix == ".json":
            out[str(rel)] = _strip(json.loads(p.read_text().replace(str(root), "<root>")))
        elif p.suffix == ".html":
            page = REPORT_TIME.sub("<time>", p.read_text().replace(str(root), "<root>"))
            out[str(rel)] = REPORT_RESOURCES.sub("<resources>", page)
        else:
            out[str(rel)] = p.read_bytes()
    return out


def _index_dir(root: Path) -> Path:
    (d,) = [p for p in (root / "_index").iterdir() if p.is_dir()]
    return d


# the Parquet datasets of a finished audit and the key that must be unique in each
DATASETS = {f"{RUN}/samples": "sample_id", f"{RUN}/candidates": "prompt_id", f"{RUN}/matches": "sample_id",
            "dups": "gid", "quarantine": "id"}


def _dataset(root: Path, name: str, key: str) -> pa.Table:
    folder = _index_dir(root) / name if "/" not in name else root / name
    t = pds.dataset(str(folder), format="parquet").to_table()
    ids = t[key].to_pylist()
    assert len(ids) == len(set(ids)), f"duplicate {key} in {folder}"
    return t.sort_by(key)


def assert_same_results(root: Path, clean: Path) -> None:
    """Byte for byte the same files under the same names (JSON: but for timings and the root), each
    Parquet dataset read back equal with no duplicate ids, summary.json equal but for paths."""
    assert _index_dir(root).name == _index_dir(clean).name  # the same index key
    for name, key in DATASETS.items():
        got, want = _dataset(root, name, key), _dataset(clean, name, key)
        assert got.num_rows > 0 or name.endswith("quarantine")
        assert got.equals(want), name
    got, want = snapshot(root), snapshot(clean)
    assert sorted(got) == sorted(want)  # the same shard (and marker, and every other) file names
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"files that differ from the uninterrupted audit's: {differ}"
    s, c = (json.loads((r / RUN / "summary.json").read_text()) for r in (root, clean))
    assert s["run"] == str(root / RUN) and c["run"] == str(clean / RUN)
    strip = {"run", "index", "config"}
    assert {k: v for k, v in s.items() if k not in strip} == {k: v for k, v in c.items() if k not in strip}
    assert {**s["index"], "uri": None} == {**c["index"], "uri": None}
    assert {**s["config"], "storage": None, "resources": None} == {**c["config"], "storage": None, "resources": None}
    assert s["extracted_train_ids"] == [f"copy-{i}" for i in range(N_SAMPLES)]  # the planted copies


# ---- 1. SIGKILL in a stage, then a rerun --------------------------------------------------------
# stage -> (its units' markers, the stage's label on the console, what exists once the stage is finished).
# Markers as StageFolder.complete() counts them: shard-*.json, not the `_tmp-` file of a write the kill cut.
KILL_POINTS = {
    "index": ("_index/*/shards/_markers/shard-*.json", "index", "_index/*/_SUCCESS.json"),
    "generate": (f"{RUN}/samples/_markers/shard-*.json", "generate", f"{RUN}/samples/_SUCCESS.json"),
    "match": (f"{RUN}/matches/_markers/shard-*.json", "match", f"{RUN}/summary.json"),
    "filter": (f"{RUN}/candidates/_markers/shard-*.json", "filter", f"{RUN}/candidates/_SUCCESS.json"),
}
UNITS = 6  # of each stage: index shards, samples shards (= match units), prompts (= filter chunks)
# the console's line for a stage that a rerun resumes: only the units left (match: it is given only those)
TO_RUN = re.compile(r"^(?P<label>[\w -]+): (?:(?P<todo>\d+) units? to run|all \d+ units complete from an earlier run)",
                    re.M)


def _kill_at_first_marker(world: World, root: Path, address: str, stage: str) -> tuple[int, str]:
    """`memex audit` until `stage` has marked its first unit, then SIGKILL to its process group;
    returns how many of the stage's units were marked when the kill landed, and the output."""
    markers, _, finished = KILL_POINTS[stage]
    proc = subprocess.Popen(_audit_cmd(world, root, address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_env(world), cwd=root.parent, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list(root.glob(markers)):
            time.sleep(0.01)
        assert proc.poll() is None, f"the audit ended before {stage} could be killed:\n" + \
            proc.stdout.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its process group, mid-stage
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=60)[0].decode()
    with pytest.raises(ProcessLookupError):  # nothing of the killed process group is left running
        os.killpg(proc.pid, 0)
    done = len(list(root.glob(markers)))
    assert done >= 1 and not list(root.glob(finished)), f"the kill did not land inside {stage}:\n{out[-3000:]}"
    return done, out


def _units_left(out: str, label: str) -> int:
    """How many of stage `label`'s units a rerun ran, as its console says."""
    for m in TO_RUN.finditer(out):
        if m["label"] == label:
            return int(m["todo"] or 0)
    raise AssertionError(f"no line for {label} in the rerun's output:\n{out[-3000:]}")


@pytest.mark.slow
def test_sigkill_in_each_stage_then_rerun_equals_an_uninterrupted_audit(world, clean, ray_head, tmp_path):
    """One storage root, killed four times: in the index stage (after its first shard), in the
    generate stage (a Ray Data actor pool), in the match stage (the audit's candidates=all matches
    right after generation) and in the filter stage; each rerun is the same command, and it
    resumes the killed stage from its marked units. The last rerun finishes, and everything it
    leaves equals the uninterrupted audit's."""
    root = tmp_path / "runs"
    previous = None
    for stage in KILL_POINTS:  # in the order the audit reaches them
        t0 = time.perf_counter()
        done, out = _kill_at_first_marker(world, root, ray_head.address, stage)
        if previous:  # the run just killed had resumed the stage killed before it
            _check_resumed(out, previous)
        print(f"killed in {stage} after {time.perf_counter() - t0:.1f}s, {done} unit(s) marked")
        previous = (stage, done)
    t0 = time.perf_counter()
    r = _run_to_completion(world, root, ray_head.address)
    print(f"final rerun: {time.perf_counter() - t0:.1f}s")
    _check_resumed(r.stdout + r.stderr, previous)
    assert_same_results(root, clean)


def _check_resumed(out: str, killed: tuple[str, int]) -> None:
    """The rerun redid only the units the killed audit had not marked (a unit in flight on a worker
    may still have finished after its driver died), and some were left: the kill landed mid-stage."""
    stage, marked = killed
    left = _units_left(out, KILL_POINTS[stage][1])
    assert left <= UNITS - marked, (stage, marked, left)
    if stage != "index":  # all the index's shards may be done; its near-duplicate units then were not
        assert left >= 1, f"{stage}: all {UNITS} units were done before the kill"


# ---- 2. training ids that look like paths are data ------------------------------------------------
PATH_LIKE_IDS = ["../../escape", "/abs/path", "a/b/c", "s3://bucket/x", "..", "con", "x%2Fy", "ünï cödé ✓/..",
                 "<b>&amp;</b>"]
BROKEN_ID = "../../quarantined/..\\con"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_path_like_training_ids_stay_data(ray_head, tmp_path):
    """A manifest whose ids look like paths, URIs, device names or markup: index, filter, match and
    report write nothing outside storage.root and no file named after an id, and every id comes
    back verbatim in the index, the matches, summary.json and (escaped) the report.

    Prompt A's 9 planted generations are exact copies of the 9 path-like rows, prompt B's unrelated."""
    import html

    from memex.layout import RunLayout
    from memex.membership import read_duplicates, read_quarantine
    from memex.report import build_report
    from memex.stages import filter as filter_stage
    from memex.stages import index, match

    from conftest import attach_index, plant_run

    rng = np.random.default_rng(11)
    # pixel noise: full of detail, so one copying generation counts (a flat picture needs two: summary)
    train = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in PATH_LIKE_IDS]
    others = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(6)]
    ids = PATH_LIKE_IDS + [f"other-{j}" for j in range(6)] + [BROKEN_ID]
    src = tmp_path / "in"
    src.mkdir()
    manifest = src / "train.parquet"
    pq.write_table(pa.table({"id": ids, "image": [encode_png(t) for t in train + others] + [b"not a png"],
                             "caption": ids}), manifest)
    root = tmp_path / "deep" / "store"  # two levels down: ../../escape joined to it would still land in tmp_path
    prompts = ["../../prompt/a", "/etc/passwd"]
    layout = plant_run(root, "r", {prompts[0]: train, prompts[1]: [blocky(rng, 16) for _ in PATH_LIKE_IDS]},
                       shard_size=4)
    before = _files(tmp_path)
    cwd_before = set(os.listdir("."))
    cfg = compose([f"trainset.path={manifest}", f"storage.root={root}", "model.path=/planted", "run.name=r",
                   f"sampling.samples_per_prompt={len(PATH_LIKE_IDS)}", "index.shards=3", "embedder.size=16",
                   "filter.min_clique=2", "match.min_generations=1",  # one planted copy a picture (the demo's
                   f"resources.address={ray_head.address}"], config_name="audit")  # tuning counts at 2)
    info = index.run(cfg)
    attach_index(layout, info)
    filter_stage.run(cfg, "r")
    s = match.run(cfg, "r")
    report = Path(build_report(layout))

    # nothing outside storage.root (nor in the working folder, nor at an absolute id), no file named after an id
    new = _files(tmp_path) - before
    assert new and all(f.startswith("deep/store/") for f in new), sorted(new)
    assert set(os.listdir(".")) == cwd_before and not os.path.exists("/abs/path")
    id_parts = {part for i in ids for part in re.split(r"[/\\]", i)} - {"", ".", ".."}
    named = {part for f in _files(root) for part in Path(f).parts} & id_parts
    assert not named, f"files named after training ids: {named}"
    assert sorted(os.listdir(report.parent)) == ["index.html"]  # one self-contained report, no asset per id

    # every id verbatim: the index, the quarantine, the matches, summary.json, the report (escaped)
    assert sorted(read_duplicates(info, {})["id"].to_pylist()) == sorted(ids[:-1])
    assert read_quarantine(info, {})["id"].to_pylist() == [BROKEN_ID]
    m = layout.matches.read()
    copies = m.filter(pc.equal(m["prompt"], prompts[0]))
    assert sorted(copies["train_id"].to_pylist()) == sorted(PATH_LIKE_IDS) and all(copies["extracted"].to_pylist())
    assert s["extracted_train_ids"] == sorted(PATH_LIKE_IDS)
    assert json.loads((root / "r" / "summary.json").read_text())["extracted_train_ids"] == sorted(PATH_LIKE_IDS)
    kept = RunLayout(str(root), "r").store.read_table(layout.matched_train_path)
    assert set(PATH_LIKE_IDS) <= set(kept["train_id"].to_pylist())
    page = report.read_text()
    assert all(html.escape(i, quote=True) in page for i in PATH_LIKE_IDS)
    assert "<b>&amp;</b>" not in page  # markup in an id is shown, not rendered


# ---- 3. a storage root in a missing bucket --------------------------------------------------------
def _buckets(s3_server) -> set[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    return {b["Name"] for b in s3.list_buckets()["Buckets"]}


@pytest.mark.slow
def test_audit_and_generate_into_a_missing_bucket_fail_naming_it_and_create_no_bucket(world, s3_server, tmp_path):
    """storage.root=s3://no-such-bucket/...: `memex audit` (whose first write is the index, under
    storage.root) and `memex generate` (the run folder) stop with one line naming the bucket, before
    any Ray work, and the bucket still does not exist: s3fs.makedirs would have created it
    (memex/storage.py). tests/test_layout.py::test_unreachable_bucket_names_the_uri checks the probe
    alone."""
    from memex.stages import generate
    from memex.storage import StorageError

    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    s3 = ["storage=s3", "storage.root=s3://no-such-bucket/runs", "+storage.options.key=testing",
          "+storage.options.secret=testing", f"storage.options.client_kwargs.endpoint_url={endpoint}",
          "+storage.options.client_kwargs.region_name=us-east-1"]
    before = _buckets(s3_server)
    assert "no-such-bucket" not in before
    cmd = [str(BIN / "memex"), "audit", "model=local", f"model.path={world.model}", "prompts=file",
           f"prompts.path={world.prompts}", "trainset=manifest", f"trainset.path={world.manifest}", *s3,
           "resources.address=127.0.0.1:9"]  # never reached: the bucket is checked first
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(world), cwd=tmp_path)
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    assert "memex: error: cannot write to index folder s3://no-such-bucket/runs/_index/" in r.stderr, r.stderr[-3000:]
    assert "The specified bucket does not exist" in r.stderr and "Traceback" not in r.stderr

    cfg = compose(["model=local", f"model.path={world.model}", "prompts=file", f"prompts.path={world.prompts}",
                   *s3])
    with pytest.raises(StorageError, match="s3://no-such-bucket/runs/.*storage.root"):
        generate.prepare(cfg)
    assert _buckets(s3_server) == before  # no bucket was created, by either


# ---- 4. a run folder and index that lost parts, or hold a damaged file ------------------------------
@pytest.mark.slow
def test_lost_or_damaged_parts_are_named_and_a_rerun_restores_the_uninterrupted_audit(world, clean, tmp_path):
    """A copy of the finished audit that lost parts, as a partial `aws s3 sync` or a hand cleanup
    leaves it: summary.json, one matches unit, one near-duplicate unit, train_rows.parquet, train.pack
    and pictures.parquet of the index (each with its marker where it has one). The rerun redoes just
    those (the index used to be reused as it was: its lost near-duplicate unit silently changed the
    prompts and the findings)
    and ends equal to the uninterrupted audit. Then a samples shard the report reads, damaged in place (a truncated
    copy): the rerun fails in one line naming the file and how to recover, changes nothing, and
    once the file and its marker are removed as it says, the rerun again equals the clean audit."""
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(clean, root)
    idx = _index_dir(root)
    lost = [root / RUN / "summary.json", root / RUN / "matches" / "shard-000002.parquet",
            root / RUN / "matches" / "_markers" / "shard-000002.json", idx / "dups" / "shard-000001.parquet",
            idx / "dups" / "_markers" / "shard-000001.json", idx / "train_rows.parquet", idx / "train.pack",
            idx / "pictures.parquet"]
    for p in lost:
        p.unlink()
    r = _run_to_completion(world, root, None)
    out = r.stdout + r.stderr
    assert _units_left(out, "match") == 1 and _units_left(out, "near-duplicates") == 1, out[-3000:]
    assert "parts of it are gone" in out and _units_left(out, "index") == 0
    assert all(p.exists() for p in lost)
    assert_same_results(root, clean)

    # a shard the rerun reads: the report's, of a prompt with a shown pair (it reads no other since it
    # stopped scanning every shard for at most 200 pairs)
    from memex.layout import RunLayout
    from memex.plan import SamplePlan

    shown = [k for k, p in enumerate(json.loads((root / RUN / "summary.json").read_text())["per_prompt"])
             if p["counted_samples"]]
    unit = SamplePlan.read(RunLayout(str(root), RUN).store).shards_of(shown[0])[0]
    shard = root / RUN / "samples" / f"shard-{unit:06d}.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    before = snapshot(root)
    r = subprocess.run(_audit_cmd(world, root, None), capture_output=True, text=True, timeout=400,
                       env=_env(world), cwd=root.parent)
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout + r.stderr)[-3000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("memex: error:")]
    assert f"{shard} is not readable Parquet" in line and f"_markers/shard-{unit:06d}.json" in line, line
    assert snapshot(root) == before
    shard.unlink()
    (root / RUN / "samples" / "_markers" / f"shard-{unit:06d}.json").unlink()
    r = _run_to_completion(world, root, None)
    assert _units_left(r.stdout + r.stderr, "generate") == 1
    assert_same_results(root, clean)
