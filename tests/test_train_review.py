"""`memex train` after a review: the text encoder run once per distinct caption, the expanded manifest written at
the end rather than held, caption faults refused before any image is decoded, binary captions on an
unconditional model.

Names from memex.training that the code before did not have are used inside each test, so every test of this
file runs (and fails where it tests a fix) against that code too."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_train_robust import _cfg  # tests/test_train.py's tiny run: 16 px, two UNet levels, a few steps

from memex import tiny
from memex.images import encode_png
from memex.manifest import ManifestError, expand_duplicates, read_manifest
from memex.synth import logo
from memex.training import MANIFEST_FILE, train


def _manifest(path, n=12, captions=None, **columns):
    """n logos, their captions (default: 3 distinct, repeated), and any other columns."""
    pics = [logo(k, 16)[0] for k in range(n)]
    caps = captions if captions is not None else [f"logo kind {k % 3}" for k in range(n)]
    pq.write_table(pa.table({"id": [f"i{k}" for k in range(n)], "image": [encode_png(p) for p in pics],
                             "caption": caps, **columns}), path)
    return path


def _weights(out):
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def test_the_text_encoder_encodes_each_distinct_caption_once_and_trains_as_before(tmp_path, monkeypatch):
    """The encoder ran over one caption an image, all at once (3,000 images of 10 captions: one call of batch
    3,001), and kept every image's embedding (~12 KB each at the defaults) on the device. Now it runs on the
    distinct captions; each image's conditioning is its caption's embedding, the same floats, so a run trains
    the same weights as one conditioned on per-image embeddings."""
    import memex.training as training

    path = _manifest(tmp_path / "m.parquet")
    seen = []
    build = tiny.build_text_encoder

    def spy(*a, **k):
        enc = build(*a, **k)
        fwd = enc.forward
        enc.forward = lambda ids, *x, **y: seen.extend(ids.tolist()) or fwd(ids, *x, **y)
        return enc

    monkeypatch.setattr(tiny, "build_text_encoder", spy)
    out = train(_cfg(path, tmp_path / "new", "trainer.steps=4", "trainer.cond_dropout=0.3"))
    assert len(seen) == 3 + 1  # 3 distinct captions and the empty one (cond_dropout's); it was 12 + 1
    assert len({tuple(ids) for ids in seen}) == len(seen)

    def per_image(tokenizer, encoder, captions, max_length):  # the code before: one row an image, then ""
        with torch.no_grad():
            tok = tokenizer(captions + [""], padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="pt")
            emb = encoder(tok.input_ids)[0]
        return emb, torch.arange(len(captions))

    tok = tiny.build_tokenizer(tmp_path / "tok", max_length=24)
    enc = build(len(tok), 24, hidden=64, seed=0, layers=2)
    caps = [f"logo kind {k % 3}" for k in range(12)] + ["a logo", "", "logo kind 1"]
    emb, of = training.encode_captions(tok, enc, caps, 24)
    ref, _ = per_image(tok, enc, caps, 24)
    assert len(emb) == 5 + 1 and of.tolist()[:4] == [0, 1, 2, 0]
    assert torch.equal(emb[of], ref[:-1]) and torch.equal(emb[-1], ref[-1])  # each row's, bit for bit

    monkeypatch.setattr(training, "encode_captions", per_image)
    before = train(_cfg(path, tmp_path / "old", "trainer.steps=4", "trainer.cond_dropout=0.3"))
    new, old = _weights(out), _weights(before)
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


def test_the_training_manifest_is_written_at_the_end_as_the_expanded_manifest(tmp_path, monkeypatch):
    """load_training_set copied every example's encoded image (copies included) and the run held it to write
    training_manifest.parquet at the end (19 MiB of images x 40 copies: 752 MiB). Now it keeps the examples'
    ids, and the file is written from the manifest read again, a few rows at a time: the same rows, order and
    schema as expand_duplicates' table."""
    import memex.training as training

    path = tmp_path / "m.parquet"
    _manifest(path, score=[k / 7 for k in range(12)], tags=[[f"t{k}"] * (k % 3) for k in range(12)])
    meta = pq.read_table(path)
    pq.write_table(meta.replace_schema_metadata({"source": "review"}), path)  # kept, as Arrow's take keeps it
    dup = "data.duplication=[{copies: 5, ids: [i3]}, {copies: 3, count: 4}]"
    cfg = _cfg(path, tmp_path / "out", dup, "data.duplication_seed=7")
    examples = training.load_training_set(cfg)[0]
    held = examples.table if hasattr(examples, "table") else examples
    assert "image" not in held.column_names and held.num_rows == 5 + 4 * 3 + 7

    monkeypatch.setattr(training, "WRITE_ROWS", 4)  # several writes, a row group each
    out = train(cfg)
    want = expand_duplicates(read_manifest(str(path)), cfg.data.duplication, 7)
    got = pq.read_table(out / MANIFEST_FILE)
    assert got.schema.equals(want.schema, check_metadata=True) and got.schema.metadata[b"source"] == b"review"
    assert got.equals(want) and pq.ParquetFile(out / MANIFEST_FILE).metadata.num_row_groups == 6


def test_a_manifest_changed_while_the_model_trained_is_refused_at_the_save(tmp_path, monkeypatch):
    """The expanded manifest is written from data.path read again: one whose rows changed since training read
    them would not be the training set. Refused, and the run finishes from its last checkpoint once the
    manifest trained on is back."""
    import memex.training as training

    path = _manifest(tmp_path / "m.parquet")
    kept = path.read_bytes()
    real = training.recipe

    def rewrite(cfg, *a, **k):  # once the images are decoded: another picture under id i5
        t = pq.read_table(path)
        image = t["image"].to_pylist()
        image[5] = encode_png(logo(40, 16)[0])
        pq.write_table(t.set_column(1, "image", pa.array(image, pa.binary())), tmp_path / "new.parquet")
        os.replace(tmp_path / "new.parquet", path)
        return real(cfg, *a, **k)

    monkeypatch.setattr(training, "recipe", rewrite)
    with pytest.raises(ManifestError, match="changed while the model trained"):
        train(_cfg(path, tmp_path / "out"))
    assert not (tmp_path / "out" / MANIFEST_FILE).exists() and not (tmp_path / "out" / "model_index.json").exists()
    monkeypatch.setattr(training, "recipe", real)
    path.write_bytes(kept)
    out = train(_cfg(path, tmp_path / "out"))
    assert pq.read_table(out / MANIFEST_FILE)["id"].to_pylist() == [f"i{k}" for k in range(12)]


def test_captions_that_would_train_as_one_are_refused_before_any_image_is_decoded(tmp_path, monkeypatch):
    """check_captions_fit ran after every image was fetched and decoded (300 of 300 before the refusal)."""
    import memex.training as training

    caps = [f"a photograph of a city street with cars and people walking, view {k}" for k in range(8)]
    path = _manifest(tmp_path / "m.parquet", n=8, captions=caps)
    decoded = []
    real = training.load_image
    monkeypatch.setattr(training, "load_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    with pytest.raises(ManifestError, match="differ only past"):
        train(_cfg(path, tmp_path / "out", "arch.max_length=48"))
    assert decoded == []


def test_an_unconditional_model_trains_on_a_manifest_whose_captions_are_bytes(tmp_path):
    """A binary caption column (text kept as bytes, as WebDataset's .txt members are), which an unconditional
    model never reads: recipe()'s json.dumps of the captions raised a bare TypeError after every image was
    decoded. (Text captions hash as before: checkpoints of earlier runs still resume.)"""
    path = _manifest(tmp_path / "m.parquet", n=4,
                     captions=pa.array([f"logo {k}".encode() for k in range(4)], pa.binary()))
    out = train(_cfg(path, tmp_path / "out", "arch=uncond_small"))
    assert (out / "model_index.json").is_file()
