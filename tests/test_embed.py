import numpy as np
import pytest
import torch

from memex.config import EmbedderConfig, EmbedderKind
from memex.embed import IMAGENET_MEAN, IMAGENET_STD, EmbedderError, make_embedder
from memex.synth import logo


def _images(n: int, size: int = 32) -> np.ndarray:
    return np.stack([logo(i, size)[0] for i in range(n)])


def test_pixel_embedding_distance_is_mean_squared_pixel_difference():
    e = make_embedder(EmbedderConfig("pixels", size=32, batch_size=3))  # 3: several batches
    imgs = _images(7)
    v = e(imgs)
    assert v.shape == (7, 3 * 32 * 32) == (7, e.dim) and v.dtype == np.float32
    assert e.metric == "l2" and e.name == "pixels:32"
    x = imgs.astype(np.float64) / 255
    for i, j in [(0, 1), (2, 5), (3, 6)]:
        mse = ((x[i] - x[j]) ** 2).mean()
        assert mse > 1e-3  # distinct logos
        assert np.isclose(((v[i] - v[j]) ** 2).sum(), mse, rtol=1e-5)
    assert np.array_equal(e(imgs[:1]), v[:1])  # batching does not change a vector


def test_pixel_embedder_resizes_and_handles_empty_input():
    e = make_embedder(EmbedderConfig(EmbedderKind.pixels, size=8))  # the config enum works as kind
    v = e(_images(2, 40))
    assert v.shape == (2, 192)
    # a flat image stays flat after resizing: every coordinate is value / sqrt(dim)
    flat = np.full((1, 40, 24, 3), 51, np.uint8)
    assert np.allclose(e(flat), 0.2 / np.sqrt(192), atol=1e-6)
    assert e(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 192)
    with pytest.raises(EmbedderError, match="expected uint8 images"):
        e(np.zeros((2, 32, 32, 3), np.float32))


class TinyDescriptor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


def test_sscd_torchscript_embedder(tmp_path):
    torch.manual_seed(0)
    scripted = torch.jit.script(TinyDescriptor().eval())
    scripted.save(str(tmp_path / "sscd.pt"))
    e = make_embedder(EmbedderConfig("sscd", path=str(tmp_path / "sscd.pt"), size=32, batch_size=2))
    assert e.dim == 16 and e.metric == "ip" and str(tmp_path / "sscd.pt") in e.name
    imgs = _images(5)
    v = e(imgs)
    assert v.shape == (5, 16) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    twin = e(np.stack([imgs[3], imgs[3]]))
    assert np.array_equal(twin[0], twin[1]) and np.allclose(twin[0], v[3], atol=1e-6)
    # the same as running the scripted module by hand on ImageNet-normalised input
    x = (imgs.astype(np.float32) / 255 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    with torch.no_grad():
        ref = scripted(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.allclose(v, ref, atol=1e-5)
    assert not np.allclose(v[0], v[1], atol=1e-3)  # different images, different descriptors


def test_sscd_from_fsspec_uri_and_bad_files(tmp_path):
    import fsspec

    buf = tmp_path / "m.pt"
    torch.jit.script(TinyDescriptor().eval()).save(str(buf))
    fsspec.filesystem("memory").pipe_file("/embed-test/sscd.pt", buf.read_bytes())
    e = make_embedder(EmbedderConfig("sscd", path="memory://embed-test/sscd.pt", size=16))
    assert e(_images(1, 16)).shape == (1, 16)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(EmbedderError, match="embedder.path=.*junk.pt is not a TorchScript model"):
        make_embedder(EmbedderConfig("sscd", path=str(tmp_path / "junk.pt")))
    with pytest.raises(EmbedderError, match="embedder.path=.*absent.pt does not exist.*sscd-copy-detection"):
        make_embedder(EmbedderConfig("sscd", path=str(tmp_path / "absent.pt")))


def test_an_sscd_path_at_its_folder_names_the_file_to_set(tmp_path):
    """embedder.path at the folder holding the .pt: the preflight (and the load) raised a raw
    IsADirectoryError naming no setting; now the file in it is named, at both."""
    from memex.embed import check_embedder

    torch.jit.script(TinyDescriptor().eval()).save(str(tmp_path / "sscd_disc_mixup.torchscript.pt"))
    for call in (check_embedder, make_embedder):
        with pytest.raises(EmbedderError, match=r"embedder.path=.* is a folder: set it to the SSCD TorchScript file "
                                                r"in it \(sscd_disc_mixup.torchscript.pt\)"):
            call(EmbedderConfig("sscd", path=str(tmp_path), size=16))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=16, intermediate_size=37)
    root = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(cfg).save_pretrained(root / "with_processor")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "with_processor")
    CLIPVisionModelWithProjection(cfg).save_pretrained(root / "bare")  # no preprocessor_config.json
    return root


@pytest.mark.parametrize("folder", ["with_processor", "bare"])
def test_clip_embedder_from_local_folder(tiny_clip, folder):
    e = make_embedder(EmbedderConfig("clip", path=str(tiny_clip / folder), size=32, batch_size=3))
    assert e.dim == 16 and e.metric == "ip" and e.name.startswith("clip:")
    assert (e.processor is None) == (folder == "bare")
    imgs = _images(4)
    v = e(imgs)
    assert v.shape == (4, 16) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert np.allclose(e(imgs), v, atol=1e-6)  # deterministic (eval mode: no dropout)
    assert not np.allclose(v[0], v[1], atol=1e-3)


def test_a_clip_saved_in_half_precision_embeds_in_float32(tiny_clip, tmp_path):
    """transformers 5 loads a folder in the dtype it was saved in: a bf16 save ran the whole tower in bf16,
    whose cosines are coarser than the near-duplicate cut (0.95). It embeds as its float32 self does."""
    from transformers import CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection.from_pretrained(tiny_clip / "bare").to(torch.bfloat16).save_pretrained(tmp_path)
    half = make_embedder(EmbedderConfig("clip", path=str(tmp_path), size=32))
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}
    rounded = CLIPVisionModelWithProjection.from_pretrained(tmp_path, dtype=torch.float32)
    want = make_embedder(EmbedderConfig("clip", path=str(tiny_clip / "bare"), size=32))
    want.model = rounded.eval()  # the same bf16-rounded weights, run in float32
    np.testing.assert_allclose(half(_images(3)), want(_images(3)), atol=1e-6)


def test_clip_embedder_reads_the_image_tower_of_a_whole_clip_model(tmp_path):
    """embedder.path at a whole CLIPModel (image and text towers: what openai/clip-vit-large-patch14 is).
    One saved by transformers 5 with a projection width other than 512 failed to load ("ignore_mismatched_
    sizes": its vision config kept the default 512). Its embeddings are CLIPModel.get_image_features'."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    model = CLIPModel(CLIPConfig(text_config=tower, vision_config={**tower, "image_size": 32, "patch_size": 8},
                                 projection_dim=16)).eval()
    model.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    e = make_embedder(EmbedderConfig("clip", path=str(tmp_path / "clip"), size=32))
    imgs = _images(3)
    with torch.no_grad():
        pixels = e.processor(images=list(imgs), return_tensors="pt")["pixel_values"]
        feats = model.get_image_features(pixel_values=pixels)
    feats = getattr(feats, "pooler_output", feats)  # a tensor, or an output object on newer transformers
    assert e.dim == 16 and np.allclose(e(imgs), torch.nn.functional.normalize(feats, dim=1).numpy(), atol=1e-5)


def test_clip_processor_and_fallback_agree(tiny_clip):
    """Both preprocessing paths feed the model the same normalised pixels for images at its own size."""
    import shutil

    same = tiny_clip / "same_weights"
    shutil.copytree(tiny_clip / "with_processor", same)
    (same / "preprocessor_config.json").unlink()
    imgs = _images(3)
    a = make_embedder(EmbedderConfig("clip", path=str(tiny_clip / "with_processor"), size=32))(imgs)
    b = make_embedder(EmbedderConfig("clip", path=str(same), size=32))(imgs)
    assert np.allclose(a, b, atol=1e-4)


def test_errors_name_the_key(tmp_path):
    with pytest.raises(EmbedderError, match="embedder.kind='dino' is unknown"):
        make_embedder(EmbedderConfig("dino"))
    for kind in ("sscd", "clip"):
        with pytest.raises(EmbedderError, match=f"embedder.kind={kind} needs a model: set embedder.path="):
            make_embedder(EmbedderConfig(kind))
    with pytest.raises(EmbedderError,
                       match="embedder.path=.*nowhere/clip is neither an existing local folder nor a hub id"):
        make_embedder(EmbedderConfig("clip", path=str(tmp_path / "nowhere" / "clip")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbedderError, match="embedder.path=.*empty has no config.json: not a transformers CLIP folder"):
        make_embedder(EmbedderConfig("clip", path=str(tmp_path / "empty")))
    (tmp_path / "empty" / "config.json").write_text("{}")  # past the cheap check: the load names it
    with pytest.raises(EmbedderError, match="embedder.path=.*empty is not a loadable CLIP checkpoint"):
        make_embedder(EmbedderConfig("clip", path=str(tmp_path / "empty")))
    import zipfile

    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:  # a zip archive, but not TorchScript
        z.writestr("a.txt", "x")
    with pytest.raises(EmbedderError, match=r"zip.pt is not a TorchScript model \(RuntimeError"):
        make_embedder(EmbedderConfig("sscd", path=str(tmp_path / "zip.pt")))
    with pytest.raises(EmbedderError, match="embedder.size and embedder.batch_size must be >= 1"):
        make_embedder(EmbedderConfig("pixels", size=0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine with no GPU")
def test_an_embedder_on_cuda_without_a_gpu_names_the_device_key():
    with pytest.raises(EmbedderError, match="set resources.device=cpu"):
        make_embedder(EmbedderConfig("pixels"), device="cuda")


def test_the_weights_stamp_of_a_cached_hub_clip_follows_its_blobs_not_its_commit(tmp_path, monkeypatch):
    """A CLIP hub id's version is its cached weight blobs (named by their content's sha256): a new commit that
    edits only the model card leaves it, new weights change it. The index refuses a reuse on another."""
    import os

    import huggingface_hub.constants

    from memex.embed import weights_stamp

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--some-org--clip"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for blob in ("a" * 64, "b" * 64, "c" * 64):
        (repo / "blobs" / blob).write_bytes(blob.encode())

    def snapshot(commit: str, weights: str) -> None:
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        os.symlink(repo / "blobs" / ("c" * 64), snap / "config.json")
        os.symlink(repo / "blobs" / weights, snap / "model.safetensors")
        (repo / "refs" / "main").write_text(commit)

    cfg = EmbedderConfig("clip", path="some-org/clip")
    assert weights_stamp(cfg) is None  # not cached here: nothing to compare
    snapshot("1" * 40, "a" * 64)
    first = weights_stamp(cfg)
    assert first == "model.safetensors blob " + "a" * 16
    snapshot("2" * 40, "a" * 64)  # a model-card edit: a new commit, the same weights
    assert weights_stamp(cfg) == first
    snapshot("3" * 40, "b" * 64)  # new weights
    assert weights_stamp(cfg) != first
    assert weights_stamp(EmbedderConfig("pixels")) is None
