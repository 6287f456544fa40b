"""The match stage's training pixels: a shard's neighbours held encoded and decoded only when the stage's
cache of cut images misses (resources.pixel_cache_mb); a training image unreadable since the index was
built is named in a warning and left out, and the rest of the shard is matched.

The training set is a uri manifest (images at their files, read again at match, as for LAION listings):
12 blocky pictures, any two ~0.4 tiled l2 apart. Prompt A's 8 generations are near-copies of t03
(+-2/255), prompt B's of t05. Expected by construction: A's generations copy t03, B's t05 while t05
can be read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex.images import encode_png
from memex.layout import RunLayout
from memex.stages import index, match

from conftest import attach_index, blocky, compose, plant_run

N_TRAIN, N_SAMPLES = 12, 8
PROMPTS = ["a copy of three", "a copy of five"]


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(0)
    train = [blocky(rng) for _ in range(N_TRAIN)]
    (tmp_path / "imgs").mkdir()
    files = [tmp_path / "imgs" / f"t{i:02d}.png" for i in range(N_TRAIN)]
    for f, t in zip(files, train):
        f.write_bytes(encode_png(t))
    manifest = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": [f.stem for f in files], "uri": [str(f) for f in files],
                             "caption": [f"caption {i}" for i in range(N_TRAIN)]}), manifest)

    def near(t):
        return np.clip(t.astype(int) + rng.integers(-2, 3, t.shape), 0, 255).astype(np.uint8)

    plant_run(tmp_path / "runs", "r", {PROMPTS[0]: [near(train[3]) for _ in range(N_SAMPLES)],
                                       PROMPTS[1]: [near(train[5]) for _ in range(N_SAMPLES)]}, shard_size=4)
    cfg = compose([f"trainset.path={manifest}", f"storage.root={tmp_path / 'runs'}", "model.path=/planted",
                   f"sampling.samples_per_prompt={N_SAMPLES}", "sampling.shard_size=4", "index.shards=1",
                   f"match.k={N_TRAIN}", "resources.executor=local", "run.name=r"], config_name="audit")
    info = index.run(cfg)
    attach_index(RunLayout(cfg.storage.root, "r"), info)
    return cfg, info, train, files


def count_decodes(monkeypatch, files) -> list:
    """Record each decode of a training image's bytes (in match, and in ingest, where the fetch decoded)."""
    import memex.ingest
    import memex.stages.match

    train_bytes = {f.read_bytes() for f in files}
    calls = []
    for mod in (memex.ingest, memex.stages.match):
        real = mod.decode

        def counted(data, *a, real=real, **kw):
            if bytes(data) in train_bytes:
                calls.append(bytes(data))
            return real(data, *a, **kw)

        monkeypatch.setattr(mod, "decode", counted)
    return calls


def test_a_shards_neighbours_are_held_encoded_and_each_decoded_once_a_cut(world, monkeypatch):
    cfg, info, train, files = world
    calls = count_decodes(monkeypatch, files)
    pixels, meta = match.fetch_training_images(info, np.arange(N_TRAIN), {})
    assert not calls and len(pixels) == N_TRAIN  # fetched, none decoded: ~0.1-0.5 MB a LAION JPEG, not ~4.5 MB
    assert np.array_equal(pixels[3], train[3]) and meta[3] == ("t03", "caption 3")
    assert len(calls) == 1  # one decode a read, nothing kept

    s = match.run(cfg, "r")
    assert s["extracted_train_ids"] == ["t03", "t05"]
    # 4 shards, every generation with all 12 neighbours: each image decoded once, then its cut one reused
    # across the shards (without the cache: once a pair, and again for the same-picture test); and the
    # two matched pictures once more, for the report's copies
    assert len(calls) - 1 == N_TRAIN + 2

    import shutil

    layout = RunLayout(cfg.storage.root, "r")
    kept = layout.matches.read().sort_by("sample_id")
    shutil.rmtree(layout.matches.path)
    del calls[:]
    cfg.resources.pixel_cache_mb = 0  # keeps one cut image: the same matches, more decodes
    assert match.run(cfg, "r")["extracted_train_ids"] == ["t03", "t05"]
    assert layout.matches.read().sort_by("sample_id").equals(kept)
    assert len(calls) >= 2 * N_SAMPLES * N_TRAIN


def test_a_training_image_unreadable_since_the_index_was_built_is_named_and_left_out(world, caplog):
    cfg, info, train, files = world
    files[5].write_bytes(b"\x89PNG\r\n\x1a\n overwritten")  # B's picture, corrupt after the index read it
    files[7].unlink()  # another neighbour, removed
    with caplog.at_level("WARNING", logger="memex.match"):
        s = match.run(cfg, "r")
    assert "training image t05 " in caplog.text and "training image t07 " in caplog.text
    assert caplog.text.count("training image t05 ") == 1  # once, though each of the 4 shards fetches it
    assert "Restore it, or rebuild the index" in caplog.text
    # A's copies found as before; B's generations compared with their other neighbours, none a copy
    assert s["extracted_train_ids"] == ["t03"] and s["candidates_verified"] == 2 * N_SAMPLES
    m = RunLayout(cfg.storage.root, "r").matches.read()
    assert not {5, 7} & set(m["train_gid"].to_pylist())
    kept = pq.read_table(RunLayout(cfg.storage.root, "r").matched_train_path)
    assert 3 in kept["train_gid"].to_pylist() and not {5, 7} & set(kept["train_gid"].to_pylist())
    # only the copies' training images: B's best other neighbours (no copies) are not fetched for the report
    assert set(kept["train_gid"].to_pylist()) == {3} and set(m["train_gid"].to_pylist()) - {3}


@pytest.mark.parametrize("alpha, copied", [(None, False), ("drop", True)])
def test_transparent_logos_are_read_as_their_trainer_read_them(tmp_path, alpha, copied):
    """A logo with transparency, trained by a script that calls image.convert("RGB") (diffusers'
    train_text_to_image), was learnt with the colours under its transparent pixels (black here).
    Composited onto white, as memex reads images by default, an exact copy of what the model learnt
    is ~1.0 tiled l2 away and never counts. trainset.alpha=drop reads them as that trainer did: the
    index (its own key) and match alike."""
    from PIL import Image

    from memex.images import decode

    rng = np.random.default_rng(4)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(N_TRAIN):
        rgba = np.concatenate([blocky(rng), np.full((32, 32, 1), 255, np.uint8)], axis=2)
        rgba[:, :16, 3] = 0  # the left half transparent
        rgba[:, :16, :3] = 0  # over black, as most editors store it
        f = tmp_path / "imgs" / f"t{i:02d}.png"
        Image.fromarray(rgba, "RGBA").save(f)
        rows.append(str(f))
    learnt = [np.asarray(Image.open(f).convert("RGB")) for f in rows]  # what the trainer saw
    assert not np.array_equal(decode(open(rows[3], "rb").read()), learnt[3])  # memex's default: onto white
    manifest = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": [f"t{i:02d}" for i in range(N_TRAIN)], "uri": rows,
                             "caption": [f"caption {i}" for i in range(N_TRAIN)]}), manifest)
    plant_run(tmp_path / "runs", "r", {PROMPTS[0]: [learnt[3]] * 4}, shard_size=4)
    cfg = compose([f"trainset.path={manifest}", f"storage.root={tmp_path / 'runs'}", "model.path=/planted",
                   "sampling.samples_per_prompt=4", "filter.min_clique=4", "sampling.shard_size=4", "index.shards=1",
                   f"match.k={N_TRAIN}",
                   "resources.executor=local", "run.name=r", "match.min_generations=1",
                   *([f"trainset.alpha={alpha}"] if alpha else [])], config_name="audit")
    info = index.run(cfg)
    assert info.alpha == alpha
    if alpha:  # an index of its own: the same listing read otherwise
        white = index.run(compose([f"trainset.path={manifest}", f"storage.root={tmp_path / 'runs'}",
                                   "model.path=/planted", "index.shards=1", "resources.executor=local"],
                                  config_name="audit"))
        assert white.key != info.key and white.alpha is None
    attach_index(RunLayout(cfg.storage.root, "r"), info)
    s = match.run(cfg, "r")
    assert (s["extracted_train_ids"] == ["t03"]) is copied
