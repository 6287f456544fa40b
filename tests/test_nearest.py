"""The match stage's search (memex/stages/nearest.py): one resident worker holds the embedder and
every index shard, loaded once per stage, and answers as one flat index over all vectors would.
No Ray here (resources.executor=local); tests/test_audit.py runs the same stage on Ray."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_embed import TinyDescriptor  # SSCD's interface: 3 x s x s in, a 16-d vector out

from memex import embed as embed_module
from memex.config import AuditConfig, EmbedderConfig, ExecutorKind, IndexConfig, ResourcesConfig
from memex.images import encode_png, fit
from memex.index import IndexSpec, build_shard, save_index
from memex.layout import IndexLayout, RunLayout
from memex.membership import IndexInfo
from memex.stages import index, match, nearest

from conftest import attach_index, blocky, compose, plant_run


@pytest.fixture
def counted(monkeypatch):
    """How many times the index's shards were read and an embedder built."""
    n = {"shard_loads": 0, "embedders": 0}
    load, make = nearest.load_shards, embed_module.make_embedder

    def counting_load(layout, shards):
        n["shard_loads"] += len(shards)
        return load(layout, shards)

    def counting_make(*a, **kw):
        n["embedders"] += 1
        return make(*a, **kw)

    monkeypatch.setattr(nearest, "load_shards", counting_load)
    monkeypatch.setattr(embed_module, "make_embedder", counting_make)
    return n


def test_neighbours_answer_as_one_flat_index_and_load_once(tmp_path, counted):
    """Three flat shards on storage: the worker's merged top k equals one IndexFlatL2 over all the
    vectors, for every call, and the shards and the embedder are loaded once for all the calls."""
    rng = np.random.default_rng(0)
    emb = EmbedderConfig("pixels", size=8)
    train = [blocky(rng) for _ in range(30)]
    x = embed_module.make_embedder(emb)(np.stack([fit(t, 8, "center_crop") for t in train]))
    spec = IndexSpec.from_config(IndexConfig(), "l2")
    layout = IndexLayout(str(tmp_path / "_index"), "k1")
    bounds = [(0, 10), (10, 20), (20, 30)]
    for s, (a, b) in enumerate(bounds):
        save_index(build_shard(x[a:b], np.arange(a, b), spec), layout.store.uri_of(layout.faiss_path(s)))
    info = IndexInfo(str(tmp_path / "_index"), "k1", bounds, "l2", x.shape[1], 30, 30, 0)
    cfg = AuditConfig(embedder=emb, resources=ResourcesConfig(executor=ExecutorKind.local))
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    counted["embedders"] = 0  # the one built above to make the vectors
    with nearest.Neighbours(cfg, info) as nb:
        assert counted == {"shard_loads": 0, "embedders": 0}  # nothing loaded before the first call
        for j, k in ((0, 5), (7, 3), (20, 30)):
            gens = [np.clip(t.astype(int) + rng.integers(-3, 4, t.shape), 0, 255).astype(np.uint8)
                    for t in train[j : j + 4]]
            D, I = nb([encode_png(g) for g in gens], k)
            qv = embed_module.make_embedder(emb)(np.stack([fit(g, 8, "center_crop") for g in gens]))
            D_ref, I_ref = flat.search(qv, k)
            assert I.shape == (4, k) and np.array_equal(I, I_ref) and np.allclose(D, D_ref, atol=1e-6)
            assert list(I[:, 0]) == list(range(j, j + 4))  # each noisy copy finds its own picture first
    assert counted["shard_loads"] == 3 and counted["embedders"] == 1 + 3  # the worker's one, the test's three


def _world(tmp_path):
    rng = np.random.default_rng(1)
    train = [blocky(rng) for _ in range(12)]
    manifest = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(12)], "image": [encode_png(t) for t in train],
                             "caption": [f"caption {i}" for i in range(12)]}), manifest)
    # 2 prompts x 12 samples in shards of 4: six samples shards to match
    samples = {"copy of t5": [train[5]] * 12, "new": [blocky(rng) for _ in range(12)]}
    plant_run(tmp_path / "runs", "r", samples, shard_size=4)
    return manifest


def test_match_stage_loads_the_index_and_embedder_once_for_all_its_units(tmp_path, counted):
    manifest = _world(tmp_path)
    cfg = compose([f"trainset.path={manifest}", f"storage.root={tmp_path / 'runs'}", "model.path=/planted",
                   "sampling.samples_per_prompt=12", "sampling.shard_size=4", "index.shards=3",
                   "embedder.size=16", "resources.executor=local", "run.name=r"], config_name="audit")
    layout = RunLayout(cfg.storage.root, "r")
    attach_index(layout, index.run(cfg))
    counted.update(shard_loads=0, embedders=0)
    s = match.run(cfg, "r")
    assert len(layout.matches.complete()) == 6 and s["candidates_verified"] == 24
    assert s["extracted_train_ids"] == ["t5"] and s["extracted_generations"] == 12
    assert counted == {"shard_loads": 3, "embedders": 1}  # once for six units (was 6 x 3 reads and 6 builds)
    assert match.run(cfg, "r") == s and counted == {"shard_loads": 3, "embedders": 1}  # complete: nothing loaded


def test_an_sscd_embedder_on_object_storage_gets_the_storage_options(tmp_path, s3_server, bucket):
    """embedder.path on S3 behind an endpoint only storage.options name (MinIO, a test server): the
    index stage and the match stage's worker both read it with those options."""
    import fsspec

    torch.manual_seed(0)
    local = tmp_path / "sscd.pt"
    torch.jit.script(TinyDescriptor().eval()).save(str(local))
    fsspec.filesystem("s3", **s3_server).pipe_file(f"{bucket}/models/sscd.pt", local.read_bytes())
    manifest = _world(tmp_path)
    url = s3_server["client_kwargs"]["endpoint_url"]
    cfg = compose([f"trainset.path={manifest}", f"storage.root={tmp_path / 'runs'}", "model.path=/planted",
                   "sampling.samples_per_prompt=12", "sampling.shard_size=4", "index.shards=2", "embedder=sscd",
                   f"embedder.path=s3://{bucket}/models/sscd.pt", "embedder.size=32", "resources.executor=local",
                   "+storage.options.key=testing", "+storage.options.secret=testing",
                   f"+storage.options.client_kwargs.endpoint_url={url}"], config_name="audit")
    info = index.run(cfg)
    assert info.metric == "ip" and info.dim == 16 and info.n_indexed == 12
    with nearest.Neighbours(cfg, info) as nb:
        S, I = nb([encode_png(blocky(np.random.default_rng(1)))], 3)  # the first training image, exactly
    assert I[0, 0] == 0 and S[0, 0] == pytest.approx(1.0, abs=1e-5)  # cosine similarity of a copy


def test_an_index_reused_with_other_embedder_weights_at_the_same_path_is_refused(tmp_path):
    """The index key holds embedder.path, not its weights: a descriptor replaced at the same path (a
    fine-tuned CLIP saved over the old folder) reused the index, searching its vectors in the old
    weights' space with queries in the new one. The index records the weights' version (a local file's
    sha256); a reuse with others is refused, naming the fix, and nothing is rebuilt or changed. A copy of
    the same weights (a new modification time) is the same version."""
    import shutil

    from memex.layout import StorageError

    weights = tmp_path / "sscd.pt"
    torch.manual_seed(0)
    torch.jit.script(TinyDescriptor().eval()).save(str(weights))
    shutil.copy(weights, tmp_path / "kept.pt")
    cfg = compose([f"trainset.path={_world(tmp_path)}", f"storage.root={tmp_path / 'runs'}", "model.path=/planted",
                   "index.shards=2", "embedder=sscd", f"embedder.path={weights}", "embedder.size=32",
                   "resources.executor=local"], config_name="audit")
    info = index.run(cfg)
    assert info.embedder_stamp and index.run(cfg).key == info.key  # the same weights: reused
    folder = tmp_path / "runs" / "_index" / info.key
    before = sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file() and p.name != "_lease.json")
    torch.manual_seed(1)
    torch.jit.script(TinyDescriptor().eval()).save(str(weights))  # fine-tuned, saved over it
    with pytest.raises(StorageError, match=rf"embedder.path={weights} changed since index .*{info.key} was built "
                                           r"with it .*Delete .* to rebuild it with the new weights"):
        index.run(cfg)
    after = sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file() and p.name != "_lease.json")
    assert after == before  # nothing rebuilt or changed
    shutil.copy(tmp_path / "kept.pt", weights)  # restored, as a new copy (a new mtime): the same weights, reused
    assert index.run(cfg) == info
    # a build killed after a shard, resumed with other weights at the same path: one index of two spaces
    (folder / "_SUCCESS.json").unlink()
    shutil.rmtree(folder / "shards")
    (folder / "shards").mkdir()
    torch.manual_seed(1)
    torch.jit.script(TinyDescriptor().eval()).save(str(weights))
    with pytest.raises(StorageError, match=rf"embedder.path={weights} changed since index .*{info.key} was begun "
                                           r"with it .*Delete .* to build it with the new weights"):
        index.run(cfg)
    shutil.copy(tmp_path / "kept.pt", weights)  # the old weights: the build finishes as it began
    assert index.run(cfg) == info
