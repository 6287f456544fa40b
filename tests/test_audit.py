"""Index, filter and match stages on local Ray, on a run whose samples are planted by hand.

Prompt A's 12 generations are near-copies of training image t03 (pixel noise of +-2/255); prompt
B's are 12 unrelated images. The training manifest holds t03 three times (a LAION-style
duplicate) and one corrupt row. Expected by construction, not by running the code first: A is
flagged and verified as a copy of t03, B is neither, the corrupt row is quarantined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex.config import ConfigError, validate_audit
from memex.images import decode, encode_png, resize
from memex.layout import RunLayout, StorageError
from memex.membership import load_shards, read_duplicates, read_quarantine
from memex.prompts import rank_by_near_duplicates
from memex.stages import filter as filter_stage
from memex.stages import index, match

from conftest import attach_index, blocky, compose, plant_run

N_TRAIN, N_SAMPLES, SIZE = 20, 12, 32
PROMPTS = ["a copy of logo three", "something new"]




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("audit")
    train = [blocky(rng) for _ in range(N_TRAIN)]
    ids = [f"t{i:02d}" for i in range(N_TRAIN)] + ["t03#1", "t03#2", "bad"]
    images = [encode_png(t) for t in train] + [encode_png(train[3])] * 2 + [b"\x89PNG\r\n\x1a\n truncated"]
    captions = [f"caption {i}" for i in range(N_TRAIN)] + ["caption 3"] * 2 + ["broken"]
    manifest = root / "train.parquet"
    pq.write_table(pa.table({"id": ids, "image": images, "caption": captions}), manifest)

    # samples: A = t03 + small noise, B = new blocky images; written with the generate stage's layout
    samples = {PROMPTS[0]: [np.clip(train[3].astype(int) + rng.integers(-2, 3, train[3].shape), 0, 255).astype(np.uint8)
                            for _ in range(N_SAMPLES)],
               PROMPTS[1]: [blocky(rng) for _ in range(N_SAMPLES)]}
    for run_name in ("r-tiled", "r-relative"):
        plant_run(root / "runs", run_name, samples)
    return root, manifest


def _cfg(world, ray_head, *extra):
    root, manifest = world
    return compose([f"trainset.path={manifest}", f"storage.root={root / 'runs'}", "model.path=/planted",
                    f"sampling.samples_per_prompt={N_SAMPLES}", "sampling.shard_size=8", "index.shards=3",
                    f"resources.address={ray_head.address}", *extra], config_name="audit")


def test_index_quarantines_the_corrupt_row_and_counts_duplicates(world, ray_head):
    info = index.run(_cfg(world, ray_head))
    assert (info.n_train, info.n_indexed, info.n_quarantined) == (N_TRAIN + 3, N_TRAIN + 2, 1)
    q = read_quarantine(info, {})
    assert q["id"].to_pylist() == ["bad"] and q["reason"][0].as_py()
    dups = {r["id"]: r["near_duplicates"] for r in read_duplicates(info, {}).to_pylist()}
    assert {i for i, n in dups.items() if n} == {"t03", "t03#1", "t03#2"} and dups["t03"] == 2
    assert rank_by_near_duplicates(read_duplicates(info, {}), 2)["prompt"].to_pylist()[0] == "caption 3"
    assert index.run(_cfg(world, ray_head)).key == info.key  # a second audit reuses the index


def test_planted_copy_is_flagged_and_verified_distinct_is_not(world, ray_head):
    cfg = _cfg(world, ray_head, "run.name=r-tiled", "match.candidates=cliques")  # the paper's filter, then match
    layout = RunLayout(cfg.storage.root, "r-tiled")
    attach_index(layout, index.run(cfg))
    filter_stage.run(cfg, "r-tiled")
    cands = {r["prompt"]: r for r in layout.candidates.read().to_pylist()}
    assert cands[PROMPTS[0]]["flagged"] and cands[PROMPTS[0]]["clique_size"] == N_SAMPLES
    assert not cands[PROMPTS[1]]["flagged"] and cands[PROMPTS[1]]["clique_size"] < 10

    s = match.run(cfg, "r-tiled")
    assert s["prompts_flagged"] == 1 and s["candidates_verified"] == N_SAMPLES
    assert s["extracted_generations"] == N_SAMPLES
    assert s["extracted_train_ids"] == ["t03"]  # three identical rows: the lowest global id wins the tie
    # one picture, stored as three rows: counted once, its rows listed
    assert s["extracted_unique_train_images"] == 1
    (pic,) = s["extracted_pictures"]
    assert {k: pic[k] for k in ("picture", "rows", "generations", "in_clique", "counted")} == \
        {"picture": "t03", "rows": ["t03", "t03#1", "t03#2"], "generations": N_SAMPLES, "in_clique": N_SAMPLES,
         "counted": True}
    assert s["unet_evaluations"] == 0  # planted samples: no UNet ran
    copied = next(p for p in s["per_prompt"] if p["prompt"] == PROMPTS[0])
    assert copied["counted_samples"] == copied["extracted_samples"] == N_SAMPLES
    assert copied["counted_train_ids"] == ["t03"]
    assert s["index"]["quarantined"] == 1
    m = layout.matches.read()
    assert max(m["distance"].to_pylist()) < 0.02  # +-2/255 noise: RMS ~0.005 per tile

    # a rerun with other filter settings on the same run folder is refused, nothing overwritten
    # (a Hydra sweep reaches this folder once a value: the message names a re-match of this run's
    # generations, run.name's interpolation included)
    with pytest.raises(StorageError, match=r"other settings \(edge_threshold: was 0.15, now 0.1\).* a run folder "
                                           r"per value: add run.samples_from=r-tiled, which matches this run's "
                                           r"generations again without generating, in <run>-m<hash> per value "
                                           r"\(run.name='r-tiled-\$\{filter.edge_threshold\}' names them\)"):
        filter_stage.run(_cfg(world, ray_head, "filter.edge_threshold=0.1", "match.candidates=cliques"), "r-tiled")
    filter_stage.run(cfg, "r-tiled")
    assert match.run(cfg, "r-tiled") == s

    # redone as that message says (candidates/ deleted, the filter run with the new value): the matches
    # verified the old cliques' members, so match names matches/ to delete too (it returned the old
    # summary, flagged count and cliques included); once deleted, the new cliques are matched
    import shutil

    shutil.rmtree(layout.candidates.path)
    new = _cfg(world, ray_head, "run.name=r-tiled", "filter.edge_threshold=0.1", "match.candidates=cliques")
    filter_stage.run(new, "r-tiled")
    with pytest.raises(StorageError, match=r"candidates \(or triage/\) was redone .* delete .*/r-tiled/matches too"):
        match.run(new, "r-tiled")
    shutil.rmtree(layout.matches.path)
    s2 = match.run(new, "r-tiled")
    assert s2["config"]["filter"]["edge_threshold"] == 0.1 and s2["extracted_train_ids"] == ["t03"]
    assert match.run(new, "r-tiled") == s2  # and a rerun returns it as it is


def test_relative_l2_over_every_sample(world, ray_head):
    cfg = _cfg(world, ray_head, "match=relative", "match.n_neighbors=8")
    layout = RunLayout(cfg.storage.root, "r-relative")
    attach_index(layout, index.run(cfg))
    s = match.run(cfg, "r-relative")  # no filter: candidates=all verifies every sample (audit skips it)
    assert s["filter"].startswith("skipped") and layout.candidates.success() is None
    assert s["prompts"] == 2 and [p["flagged"] for p in s["per_prompt"]] == [False, False]
    assert s["candidates_verified"] == 2 * N_SAMPLES  # candidates=all
    m = layout.matches.read().to_pylist()
    ext = {r["prompt"] for r in m if r["extracted"]}
    assert ext == {PROMPTS[0]}
    # a copy is far closer to its image than to the average neighbour: d ~ 0.01 / (0.5 * ~0.3)
    assert all(r["distance"] < 0.2 for r in m if r["prompt"] == PROMPTS[0])
    assert all(r["distance"] > 1.0 for r in m if r["prompt"] == PROMPTS[1])


def test_ivfpq_index_stage_shares_one_quantizer_and_finds_copies(tmp_path, ray_head):
    """index=ivfpq: a trained quantizer is written once and every shard is built on it."""
    rng = np.random.default_rng(1)
    images = [blocky(rng) for _ in range(300)]
    manifest = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": [f"b{i:03d}" for i in range(300)], "image": [encode_png(x) for x in images],
                             "caption": [f"c{i}" for i in range(300)]}), manifest)
    cfg = compose([f"trainset.path={manifest}", f"storage.root={tmp_path / 'runs'}", "model.path=/planted",
                   "index=ivfpq", "index.shards=3", "index.nlist=8", "index.pq_m=8", "index.pq_nbits=4",
                   "index.nprobe=8", "embedder.size=8", f"resources.address={ray_head.address}"], config_name="audit")
    info = index.run(cfg)
    layout = info.layout({})
    assert layout.store.exists(layout.quantizer_path) and info.n_indexed == 300
    shards = load_shards(layout, [0, 1, 2])
    assert len({faiss_centroids(s) for s in shards}) == 1  # one quantizer shared by all shards
    from memex.config import EmbedderConfig
    from memex.embed import make_embedder
    from memex.index import ShardedIndex

    # the stages decode training images and generations the same way: bicubic to embedder.size
    q = make_embedder(EmbedderConfig(kind="pixels", size=8))(np.stack([resize(x, 8) for x in images[::50]]))
    D, I = ShardedIndex(shards, info.spec(cfg.index)).search(q, 1)
    assert I[:, 0].tolist() == list(range(0, 300, 50))  # each image's nearest training row is itself
    assert np.allclose(D[:, 0], 0, atol=1e-6)  # exact re-ranking: the distance to itself is 0


def faiss_centroids(index) -> bytes:
    import faiss

    inner = faiss.downcast_index(index.index)
    ivf = faiss.extract_index_ivf(inner)
    return faiss.vector_to_array(faiss.downcast_index(ivf.quantizer).codes).tobytes()


# 10 DDIM steps instead of the checkpoint's 50 DDPM ones: 5x fewer UNet calls (~50 s less on 2 cores), and
# its memorized logos still come out (conftest.SMALL_AUDIT)


@pytest.mark.slow
def test_audit_job_on_the_shipped_demo_extracts_its_duplicated_images(tmp_path, ray_head):
    """`ray job submit --working-dir <repo> -- python jobs/audit.py ...` on the shipped checkpoint,
    scaled down to the 4 most duplicated captions (the README's command 1 on a cluster: 80 samples a
    prompt at the demo's 10 DDPM steps, a picture counted at 2 copying generations).

    Sampling is seeded, but which of the 8 images a 16-sample run extracts can move with the
    torch build, so the test asserts the property the audit must show rather than exact ids:
    extracted images are duplicated ones, and most of the 32-copy prompts are caught."""
    import json
    import os
    import subprocess
    import sys
    import uuid

    from conftest import REPO

    sid = f"memex-audit-{uuid.uuid4().hex[:8]}"
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run([ray, "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(REPO),
                          "--submission-id", sid, "--", "python", "jobs/audit.py", f"storage.root={tmp_path}",
                          "prompts.limit=4", "index.shards=2"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "unique training images extracted" in out.stdout and "run folder:" in out.stdout
    run = next(ln for ln in out.stdout.splitlines() if "run folder: " in ln).split("run folder: ")[1].strip()
    summary = json.loads((Path(run) / "summary.json").read_text())
    manifest = pq.read_table(REPO / "demo/models/demo-text/training_manifest.parquet").to_pylist()
    copies = {r["id"]: r["copies"] for r in manifest}
    extracted = summary["extracted_train_ids"]
    # the 4 prompts are captions of images with 32 copies (near-duplicate ranking); every
    # generation is matched, so a prompt's generation that lands on another duplicated logo counts too
    # (measured: 4 pictures, all 32-copy logos; ids logo-0132 and logo-0132#3 are one picture)
    assert summary["prompts"] == 4 and summary["samples"] == 4 * 80 and summary["candidates_verified"] == 4 * 80
    pictures = [p["picture"] for p in summary["extracted_pictures"]]
    assert sum(copies[p] == 32 for p in pictures) >= 3, summary["per_prompt"]
    assert all(copies[i] >= 8 for i in extracted)
    # rows of one logo (logo-0132, logo-0132#3) are one picture, counted once
    assert summary["extracted_unique_train_images"] == len(pictures) == len(set(pictures))
    assert {i.split("#")[0] for i in extracted} == set(pictures)
    # triage from the samples: each prompt's score is the mean free first-step score of its samples 0..3
    # (the triage's own seeds), so the audit spends no UNet evaluation on a triage stage
    assert summary["unet_evaluations_triage"] == 0 and not (Path(run) / "triage").exists()
    assert summary["unet_evaluations"] == 4 * 80 * 10 * 2 + summary["unet_evaluations_padding"]
    assert all(p["generations"] >= 2 for p in summary["extracted_pictures"])  # conf/tune/audit_demo.yaml
    first = pq.read_table(Path(run) / "samples", columns=["prompt_id", "sample_index", "triage_score"]).to_pylist()
    for p in summary["per_prompt"]:
        want = [r["triage_score"] for r in first if r["prompt_id"] == p["prompt_id"] and r["sample_index"] < 4]
        assert len(want) == 4 and p["triage_score"] == pytest.approx(sum(want) / 4, rel=1e-5)
    # the default storage.root (`runs`, relative) is inside Ray's copy of the working dir, deleted after the job
    out = subprocess.run([ray, "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(REPO),
                          "--submission-id", sid + "-relative", "--", "python", "jobs/audit.py", "prompts.limit=4"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode != 0 and "storage.root=runs is inside this Ray job's copy of its working_dir" in (
        out.stdout + out.stderr), (out.stdout + out.stderr)[-4000:]


@pytest.mark.slow
def test_grayscale_ddpm_audited_end_to_end(tmp_path):
    """A 1-channel DDPMPipeline (MNIST-style) through the whole `memex audit` (match=relative): its
    generations are stored as 8-bit grayscale PNGs, and the training images that are exact copies
    of three of them (planted from the same seeds, saved as grayscale) are the ones extracted.
    The other training images are unrelated smooth gray pictures."""
    import io

    from PIL import Image as PILImage

    from memex import tiny
    from memex.config import SamplingConfig
    from memex.models import load_model
    from memex.prompts import UNCONDITIONAL_ID
    from memex.sampling import Sampler, sample_seed
    from memex.stages import audit

    model_dir = tiny.build("unconditional", tmp_path / "gray", channels=1)
    sampling = SamplingConfig(num_inference_steps=3, batch_size=4)
    planted = [1, 4, 6]
    copies = Sampler(load_model(str(model_dir)), sampling).generate(
        [UNCONDITIONAL_ID] * 3, [""] * 3, [sample_seed(0, UNCONDITIONAL_ID, i) for i in planted])
    rng = np.random.default_rng(3)
    others = [np.asarray(PILImage.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).resize((16, 16),
                                                                                               PILImage.BILINEAR))
              for _ in range(30)]
    ids = [f"copy-{i}" for i in planted] + [f"other-{j:02d}" for j in range(30)]
    images = [encode_png(c) for c in copies] + [encode_png(o) for o in others]  # (16,16,1) and (16,16): mode L
    manifest = tmp_path / "gray.parquet"
    pq.write_table(pa.table({"id": ids, "image": images}), manifest)

    cfg_overrides = ["model=local", f"model.path={model_dir}", "model.kind=unconditional", "prompts=none",
                     "match=relative", "match.n_neighbors=8", "trainset=manifest", f"trainset.path={manifest}",
                     f"storage.root={tmp_path / 'runs'}", "sampling.samples_per_prompt=8",
                     "sampling.num_inference_steps=3", "sampling.batch_size=4", "sampling.shard_size=4",
                     "index.shards=2", "embedder.size=16", "resources.executor=local"]
    cfg = compose([*cfg_overrides, "budget=adaptive"], config_name="audit")  # (nightly's: one prompt keeps fixed)
    s = audit.run(cfg)
    layout = RunLayout(cfg.storage.root, s["run"].rsplit("/", 1)[1])
    samples = layout.samples.read()
    assert s["budget"]["kind"] == "fixed"  # the budget that ran (it said adaptive: "sampled in rounds")
    assert samples.num_rows == 8 and all(PILImage.open(io.BytesIO(b)).mode == "L" for b in samples["image"].to_pylist())
    assert s["filter"].startswith("skipped") and s["candidates_verified"] == 8
    assert s["index"]["luma"] is True  # a 1-channel model: searched among the training images' luma
    assert s["extracted_train_ids"] == [f"copy-{i}" for i in planted]
    m = {r["sample_id"]: r for r in layout.matches.read().to_pylist()}
    assert all(m[f"{UNCONDITIONAL_ID}/{i}"]["distance"] == 0 for i in planted)

    # the same generations made by `memex generate` (no index.json) and re-matched once the model is gone (moved,
    # a hub id not cached here): their PNGs say they are gray, so the luma index is searched again (the model's
    # config could not be read, and the colour index was searched, without a word)
    from memex.stages import generate

    gen = ["model=local", f"model.path={model_dir}", "model.kind=unconditional", "prompts=none",
           f"storage.root={tmp_path / 'runs'}", "sampling.samples_per_prompt=8", "sampling.num_inference_steps=3",
           "sampling.batch_size=4", "sampling.shard_size=4", "resources.executor=local", "run.name=gen"]
    g = compose(gen)
    generate.run(g, generate.prepare(g))
    model_dir.rename(tmp_path / "gone")
    again = audit.run(compose([*cfg_overrides, "run.samples_from=gen", "run.name=gen-rematch"], config_name="audit"))
    assert again["index"]["luma"] is True and again["extracted_train_ids"] == [f"copy-{i}" for i in planted]


@pytest.mark.slow
def test_adaptive_audit_samples_more_only_where_a_copy_shows(tmp_path, tiny_models):
    """budget=adaptive on a tiny text model whose training set holds exact copies of prompt A's own
    generations 0-7 (planted from the same seeds): round 0 gives every prompt 2 samples; A's are
    copies, so only A goes on to 8; B and C, whose generations copy nothing, stop at 2. Every
    generation is matched; the UNet evaluations add up; a rerun redoes and redecides nothing.
    resources.executor=local: the rounds' logic, not Ray (the preview test below runs both)."""
    from memex.config import SamplingConfig
    from memex.models import load_model
    from memex.plan import SamplePlan
    from memex.prompts import prompt_id
    from memex.sampling import Sampler, sample_seed
    from memex.stages import audit

    model = tiny_models["pixel_text"]
    prompts = ["apple pie", "blue lighthouse", "cat on a mat"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    sampling = SamplingConfig(num_inference_steps=3, guidance_scale=3.0, batch_size=4)
    a = prompt_id(prompts[0])
    copies = Sampler(load_model(model), sampling).generate([a] * 8, [prompts[0]] * 8,
                                                           [sample_seed(0, a, i) for i in range(8)])
    rng = np.random.default_rng(5)
    others = [blocky(rng, 16) for _ in range(20)]
    manifest = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": [f"a-{i}" for i in range(8)] + [f"o-{j:02d}" for j in range(20)],
                             "image": [encode_png(c) for c in copies] + [encode_png(o) for o in others],
                             "caption": [prompts[0]] * 8 + [f"other {j}" for j in range(20)]}), manifest)
    overrides = ["model=local", f"model.path={model}", "prompts=file", f"prompts.path={tmp_path / 'prompts.txt'}",
                 "trainset=manifest", f"trainset.path={manifest}", f"storage.root={tmp_path / 'runs'}",
                 "budget=adaptive", "budget.rounds=[2,8]", "sampling.samples_per_prompt=8",
                 "budget.continue_factor=1.0", "match.candidates=all",
                 "triage.seeds=2", "triage.keep=3",  # keep: ranks before generation, so the stage runs
                 "sampling.num_inference_steps=3", "sampling.guidance_scale=3.0",
                 "sampling.batch_size=4", "sampling.shard_size=4", "index.shards=2", "embedder.size=16",
                 "filter.min_clique=2", "resources.executor=local"]
    cfg = compose(overrides, config_name="audit")
    s = audit.run(cfg)
    layout = RunLayout.at(s["run"])
    plan = SamplePlan.read(layout.store)
    assert [(r.n_prompts, r.lo, r.hi) for r in plan.rounds] == [(3, 0, 2), (1, 2, 8)]
    assert plan.rounds[1].prompt_rows == (0,)
    per = {p["prompt"]: p for p in s["per_prompt"]}
    assert [per[p]["samples"] for p in prompts] == [8, 2, 2] and s["samples"] == 12
    assert s["candidates_verified"] == 12  # every generation matched, across both rounds
    assert {p["picture"] for p in s["extracted_pictures"]} == {f"a-{i}" for i in range(8)}
    assert per[prompts[0]]["extracted_samples"] == 8 and per[prompts[1]]["extracted_samples"] == 0
    assert all(per[p]["triage_score"] > 0 for p in prompts)
    # cost: 12 samples x 3 steps x 2 (guidance) + padding rows + triage (3 prompts x 2 seeds x 1 step x 2,
    # in one batch of 4 rows and one padded one: 8 rows x 2)
    assert s["unet_evaluations_triage"] == 16
    padding = layout.samples.success()["padded_evaluations"]  # generation's, and triage's 2 padded rows x 2
    assert s["unet_evaluations"] == 12 * 3 * 2 + padding + 16 and s["unet_evaluations_padding"] == padding + 4
    assert s["unet_evaluations_per_extracted_image"] == round(s["unet_evaluations"] / 8)
    samples = layout.samples.read(columns=["sample_id", "round", "triage_score"]).to_pylist()
    assert sorted(r["round"] for r in samples) == [0] * 6 + [1] * 6 and all(r["triage_score"] > 0 for r in samples)
    assert_readable_by_pyarrow(layout, s)
    # rerun: the same result, nothing regenerated or redecided
    markers = {i: layout.samples.read_marker(i) for i in layout.samples.complete()}
    s2 = audit.run(compose(overrides, config_name="audit"))
    assert {k: v for k, v in s2.items() if k != "report"} == {k: v for k, v in s.items() if k != "report"}
    assert {i: layout.samples.read_marker(i) for i in layout.samples.complete()} == markers


def test_preview_triage_extends_the_prompt_whose_previews_copy(tmp_path, ray_head, tiny_models):
    """triage=preview on a tiny text model whose training set holds prompt A's own previews (2 DDIM
    steps from the triage's seeds, planted): A's previews are matched back to them (tiled l2 ~0), B's
    and C's land on nothing. With the triage z-score rule off and no round-0 generation near a
    training image, the preview distance alone is what sends A, and only A, to round 1."""
    from dataclasses import replace

    from memex.config import SamplingConfig, SchedulerKind
    from memex.models import load_model
    from memex.plan import SamplePlan
    from memex.prompts import prompt_id
    from memex.sampling import Sampler, sample_seed
    from memex.stages import audit

    model = tiny_models["pixel_text"]
    prompts = ["apple pie", "blue lighthouse", "cat on a mat"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    gen = SamplingConfig(num_inference_steps=3, guidance_scale=3.0, batch_size=4, scheduler=SchedulerKind.ddpm)
    a = prompt_id(prompts[0])
    previews = Sampler(load_model(model), replace(gen, scheduler=SchedulerKind.ddim, num_inference_steps=2)).generate(
        [a] * 2, [prompts[0]] * 2, [sample_seed(0, a, i) for i in range(2)])
    rng = np.random.default_rng(6)
    others = [blocky(rng, 16) for _ in range(20)]
    manifest = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": ["a-0", "a-1"] + [f"o-{j:02d}" for j in range(20)],
                             "image": [encode_png(c) for c in previews] + [encode_png(o) for o in others],
                             "caption": [prompts[0]] * 2 + [f"other {j}" for j in range(20)]}), manifest)
    overrides = ["model=local", f"model.path={model}", "prompts=file", f"prompts.path={tmp_path / 'prompts.txt'}",
                 "trainset=manifest", f"trainset.path={manifest}", f"storage.root={tmp_path / 'runs'}",
                 "triage=preview", "triage.seeds=2", "triage.steps=2", "budget=adaptive", "budget.rounds=[2,6]",
                 "sampling.samples_per_prompt=6",
                 "budget.continue_factor=1.0", "budget.continue_triage_z=null", "sampling.scheduler=ddpm",
                 "sampling.num_inference_steps=3", "sampling.guidance_scale=3.0", "sampling.batch_size=4",
                 "sampling.shard_size=4", "index.shards=2", "embedder.size=16", "filter.min_clique=2",
                 f"resources.address={ray_head.address}"]
    s = audit.run(compose(overrides, config_name="audit"))
    layout = RunLayout.at(s["run"])
    tri = {r["prompt"]: r for r in layout.triage.read().to_pylist()}
    assert tri[prompts[0]]["distance"] < 0.02 and tri[prompts[0]]["train_gid"] in (0, 1)
    assert min(tri[p]["distance"] for p in prompts[1:]) > 0.15
    assert all(r["score"] == pytest.approx(-r["distance"]) for r in tri.values())
    assert layout.previews.read().num_rows == 6  # 3 prompts x 2 previews, kept
    round0 = layout.matches.read(columns=["sample_id", "distance"]).to_pylist()
    assert min(r["distance"] for r in round0 if r["sample_id"].endswith(("/0", "/1"))) > 0.15  # no other sign
    plan = SamplePlan.read(layout.store)
    assert [(r.n_prompts, r.lo, r.hi, r.prompt_rows) for r in plan.rounds][1] == (1, 2, 6, (0,))
    per = {p["prompt"]: p for p in s["per_prompt"]}
    assert [per[p]["samples"] for p in prompts] == [6, 2, 2]
    assert per[prompts[0]]["triage_distance"] == pytest.approx(tri[prompts[0]]["distance"])
    # cost: the previews (6 rows x 2 steps x 2, padded to 2 batches of 4: 8 rows) + 10 samples x 3 x 2 + padding
    assert s["unet_evaluations_triage"] == 8 * 2 * 2
    padding = layout.samples.success()["padded_evaluations"]  # generation's, and the previews' 2 rows x 2 x 2
    assert s["unet_evaluations"] == 10 * 3 * 2 + padding + 32 and s["unet_evaluations_padding"] == padding + 8
    assert "Previews matched to the training set" in (Path(layout.path) / "report" / "index.html").read_text()

    # the same audit with resources.executor=local (no Ray: each stage's units in this process, its
    # model loaded once) leaves the same tables and the same summary but for paths and timings
    moved = {f"storage.root={tmp_path / 'runs'}": f"storage.root={tmp_path / 'here'}",
             f"resources.address={ray_head.address}": "resources.executor=local"}
    here = audit.run(compose([moved.get(o, o) for o in overrides], config_name="audit"))
    local = RunLayout.at(here["run"])
    for name in ("samples", "previews", "triage", "candidates", "matches"):
        got, want = (getattr(x, name).read() for x in (local, layout))
        assert got.num_rows == want.num_rows > 0 and got.sort_by(got.column_names[0]).equals(
            want.sort_by(want.column_names[0])), name
    drop = {"run", "index", "config", "report", "seconds", "generated_shards"}
    assert {k: v for k, v in here.items() if k not in drop} == {k: v for k, v in s.items() if k not in drop}
    assert here["index"]["key"] == s["index"]["key"] and here["run"] != s["run"]

    # a re-match of it (run.samples_from) reads its previews, triage and rounds where they are
    again = audit.run(compose([*overrides, f"run.samples_from={layout.run_name}", "run.name=rematch"],
                              config_name="audit"))
    assert [p["triage_distance"] for p in again["per_prompt"]] == [p["triage_distance"] for p in s["per_prompt"]]
    assert [p["samples"] for p in again["per_prompt"]] == [6, 2, 2]
    assert again["unet_evaluations"] == s["unet_evaluations"] and again["samples_from"] == s["run"]
    assert "Previews matched to the training set" in (Path(layout.path).parent / "rematch" / "report" /
                                                      "index.html").read_text()
    # with match=relative: refused for an audit of a preview source (its rounds compare previews with
    # match.threshold), taken by a re-match, which decides no round
    with pytest.raises(ConfigError, match=r"triage=preview .* set match=tiled"):
        validate_audit(compose([*overrides, "match=relative"], config_name="audit"))
    rel = audit.run(compose([*overrides, f"run.samples_from={layout.run_name}", "run.name=rel", "match=relative"],
                            config_name="audit"))
    assert rel["config"]["match"]["distance"] == "relative_l2"
    assert [p["samples"] for p in rel["per_prompt"]] == [6, 2, 2]


def assert_readable_by_pyarrow(layout: RunLayout, s: dict) -> None:
    """Every folder of the run and of its index that holds Parquet files is one dataset that
    `pyarrow.dataset.dataset(folder)` reads as it is (markers, _SUCCESS.json, _settings.json and
    the lease start with `_`), with the row counts the summary states; no lease is left behind."""
    import pyarrow.dataset as ds

    run, index = Path(layout.path), Path(s["index"]["uri"])
    for root in (run, index):
        assert not (root / "_lease.json").exists()
    # the folders below the two roots (which hold JSON and the single-file tables read below)
    folders = {p.parent for root in (run, index) for p in root.rglob("*.parquet")
               if not any(part.startswith("_") for part in p.relative_to(root).parts)} - {run, index}
    rows = {f: ds.dataset(f).count_rows() for f in folders}  # fails on any non-Parquet file in a folder
    assert rows == {run / "triage": s["prompts"], run / "samples": s["samples"],
                    run / "candidates": s["prompts_sampled"], run / "matches": s["candidates_verified"],
                    index / "dups": s["index"]["indexed"], index / "quarantine": s["index"]["quarantined"],
                    index / "links": rows[index / "links"]}  # each unit's forest of its edges (joined below)
    # pictures.parquet: every row with a near-duplicate (and no other), as the dups counts say
    duplicated = ds.dataset(index / "dups").to_table(filter=ds.field("near_duplicates") > 0).num_rows
    assert ds.dataset(index / "pictures.parquet").count_rows() == duplicated
    # the single-file tables of the two roots
    assert ds.dataset(run / "prompts.parquet").count_rows() == s["prompts"]
    assert ds.dataset(index / "train_rows.parquet").count_rows() == s["index"]["train_images"]
    matched = ds.dataset(run / "matched_train_images.parquet").to_table()
    assert set(matched["train_id"].to_pylist()) >= set(s["extracted_train_ids"])
    # only the extracted matches' images: the report shows no other (200 near misses were fetched for nothing)
    within = ds.dataset(run / "matches").to_table(filter=ds.field("extracted"))
    assert set(matched["train_gid"].to_pylist()) == set(within["train_gid"].to_pylist())
    assert ds.dataset(run / "matches").count_rows() > within.num_rows  # there were non-copies to leave out
    assert (run / "summary.json").exists() and not (run / "matches" / "summary.json").exists()


def test_a_low_complexity_look_alike_is_matched_but_not_counted(tmp_path, ray_head):
    """summary.json through match.run (not a hand-made summary): one generation lands on a flat
    training picture (low complexity: it needs 3 copying generations), twelve copy a detailed one.
    The flat picture is in uncounted_pictures, left out of the headline count and of its prompt's
    counted_*; its extracted_samples still show the hit."""
    rng = np.random.default_rng(3)
    train = [blocky(rng) for _ in range(10)]
    flat = np.full((SIZE, SIZE, 3), (90, 120, 200), np.uint8)  # a crop of sky: no detail at all
    ids = [f"t{i:02d}" for i in range(10)] + ["sky"]
    manifest = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": ids, "image": [encode_png(t) for t in [*train, flat]],
                             "caption": [f"caption {i}" for i in range(11)]}), manifest)

    def near(img):
        return np.clip(img.astype(int) + rng.integers(-2, 3, img.shape), 0, 255).astype(np.uint8)

    plant_run(tmp_path / "runs", "r", {"sky-ish": [near(flat)] + [blocky(rng) for _ in range(N_SAMPLES - 1)],
                                       "a copy of t05": [near(train[5]) for _ in range(N_SAMPLES)]})
    cfg = compose([f"trainset.path={manifest}", f"storage.root={tmp_path / 'runs'}", "model.path=/planted",
                   f"sampling.samples_per_prompt={N_SAMPLES}", "sampling.shard_size=8", "index.shards=2",
                   f"resources.address={ray_head.address}", "run.name=r", "match.candidates=all"],
                  config_name="audit")
    attach_index(RunLayout(cfg.storage.root, "r"), index.run(cfg))
    s = match.run(cfg, "r")
    assert s["extracted_generations"] == 1 + N_SAMPLES
    assert [p["picture"] for p in s["extracted_pictures"]] == ["t05"] and s["extracted_unique_train_images"] == 1
    assert s["extracted_train_ids"] == ["t05"]
    (sky,) = s["uncounted_pictures"]
    assert (sky["picture"], sky["generations"], sky["low_complexity"], sky["counted"]) == ("sky", 1, True, False)
    pp = {p["prompt"]: p for p in s["per_prompt"]}
    assert (pp["sky-ish"]["extracted_samples"], pp["sky-ish"]["train_ids"]) == (1, ["sky"])
    assert (pp["sky-ish"]["counted_samples"], pp["sky-ish"]["counted_train_ids"]) == (0, [])
    assert (pp["a copy of t05"]["counted_samples"], pp["a copy of t05"]["counted_train_ids"]) == (N_SAMPLES, ["t05"])


def test_the_summary_counts_and_reads_only_the_triage_its_config_runs(world, ray_head):
    """A triage=preview audit stopped after its triage stage left triage/ (320 UNet evaluations here); the rerun
    without it read no preview score but counted the preview's cost in unet_evaluations, and a rerun of a finished
    audit with other triage settings returned the old summary (its scores, cost and config). The summary now
    counts the triage the config reads, and is written again when the triage settings change."""
    from memex.layout import TRIAGE_SCHEMA
    from memex.prompts import prompt_id

    root, manifest = world
    t03 = pq.read_table(manifest).to_pylist()[3]
    copy = decode(t03["image"])
    layout = plant_run(root / "runs", "r-triage", {PROMPTS[0]: [copy] * 6, PROMPTS[1]: [copy[::-1]] * 6})
    pids = [prompt_id(p) for p in PROMPTS]
    layout.triage.write_shard(0, pa.table({"prompt_id": pids, "prompt": PROMPTS, "score": [-0.01, -0.4],
                                           "unet_evaluations": [160, 160], "distance": [0.01, 0.4],
                                           "train_gid": [3, 4]}, schema=TRIAGE_SCHEMA))
    layout.triage.mark_success({"unet_evaluations": 320, "padded_evaluations": 0})
    plain_cfg = _cfg(world, ray_head, "run.name=r-triage", "sampling.samples_per_prompt=6")
    preview = _cfg(world, ray_head, "run.name=r-triage", "sampling.samples_per_prompt=6", "triage=preview")
    attach_index(layout, index.run(plain_cfg))
    filter_stage.run(plain_cfg, "r-triage")

    s = match.run(plain_cfg, "r-triage")
    assert (s["unet_evaluations"], s["unet_evaluations_triage"]) == (0, 0)  # planted: no UNet ran for this config
    assert all(p["triage_distance"] is None for p in s["per_prompt"])
    s2 = match.run(preview, "r-triage")  # the config that reads triage/: its scores and its cost
    assert (s2["unet_evaluations"], s2["unet_evaluations_triage"]) == (320, 320)
    assert {p["prompt_id"]: p["triage_distance"] for p in s2["per_prompt"]} == {pids[0]: pytest.approx(0.01),
                                                                                 pids[1]: pytest.approx(0.4)}
    assert s2["config"]["triage"]["kind"] == "preview" and s2["extracted_train_ids"] == s["extracted_train_ids"]
    assert match.run(plain_cfg, "r-triage") == s  # back: written again, equal to the first


def test_the_reports_training_images_are_kept_a_chunk_at_a_time_and_restored_when_lost(world, ray_head,
                                                                                        monkeypatch):
    """keep_for_report fetched and re-encoded every extracted picture's training image at once (tens of thousands
    with candidates=all at LAION's 1.5 MP: the driver out of memory, on every rerun); now `chunk` at a time, the
    same file. A finished run folder that lost matched_train_images.parquet (a partial copy) returned early and
    never wrote it again: the report said "not stored" for every pair. A rerun now restores it."""
    root, manifest = world
    train = {r["id"]: decode(r["image"]) for r in pq.read_table(manifest).to_pylist() if r["id"] != "bad"}
    # prompt A copies t05, prompt B copies t07 and t09 (half each): three pictures extracted
    layout = plant_run(root / "runs", "r-keep", {PROMPTS[0]: [train["t05"]] * 6,
                                                 PROMPTS[1]: [train["t07"]] * 3 + [train["t09"]] * 3})
    cfg = _cfg(world, ray_head, "run.name=r-keep", "sampling.samples_per_prompt=6")
    info = index.run(cfg)
    attach_index(layout, info)
    from memex.storage import StageFolder

    read, real_read = [], StageFolder.read  # the candidates' summaries read no per-sample distances (500 floats a
    monkeypatch.setattr(StageFolder, "read", lambda self, *a, **k: read.append((self.name, k.get("columns")))
                        or real_read(self, *a, **k))  # prompt: ~5.5 GB as Python objects at 350,000 prompts)
    filter_stage.run(cfg, "r-keep")
    s = match.run(cfg, "r-keep")
    assert [c for n, c in read if n == "candidates"] and \
        all(c is not None and "nearest_distances" not in c for n, c in read if n == "candidates")
    assert sorted(s["extracted_train_ids"]) == ["t05", "t07", "t09"]
    whole = pq.read_table(layout.matched_train_path)
    assert sorted(whole["train_id"].to_pylist()) == ["t05", "t07", "t09"]

    asked = []
    real = match.fetch_training_images
    monkeypatch.setattr(match, "fetch_training_images", lambda info, gids, *a, **k: asked.append(len(gids)) or
                        real(info, gids, *a, **k))
    match.keep_for_report(layout, info, {}, chunk=2, group=2)
    assert asked == [2, 1] and pq.read_table(layout.matched_train_path).equals(whole)
    asked.clear()
    match.keep_for_report(layout, info, {}, chunk=2)  # fetched in one group (one read of the rows' footer)
    assert asked == [3] and pq.read_table(layout.matched_train_path).equals(whole)

    Path(layout.matched_train_path).unlink()
    assert match.run(cfg, "r-keep") == s  # the summary as it was, and the lost file written again
    assert pq.read_table(layout.matched_train_path).equals(whole)
