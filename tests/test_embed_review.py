import pytest
import torch

from memex.config import EmbedderConfig
from memex.embed import CLIPEmbedder, EmbedderError, check_embedder, make_embedder

TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
             projection_dim=16, intermediate_size=37)


def test_a_clip_vision_tower_without_its_projection_is_refused(tmp_path):
    """A CLIPVisionModel folder (model_type clip_vision_model, no visual_projection weights) loaded as
    CLIPVisionModelWithProjection: transformers filled the projection with new random weights at every load,
    so the index and the queries were embedded by different projections, and the search was silently wrong."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TOWER)).save_pretrained(tmp_path / "tower")
    cfg = EmbedderConfig("clip", path=str(tmp_path / "tower"), size=32)
    want = r"embedder.path=.*tower is a CLIP vision tower saved without its projection .*CLIPVisionModelWithProjection"
    for refuse in (lambda: check_embedder(cfg),  # the audit's preflight, from the safetensors header
                   lambda: make_embedder(cfg),
                   lambda: CLIPEmbedder(cfg.path, 32)):  # the load itself, past the preflight
        with pytest.raises(EmbedderError, match=want):
            refuse()


def test_a_clip_folder_missing_other_weights_is_refused(tmp_path):
    """Any weight the load would initialise at random is refused, naming it."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TOWER)).save_pretrained(tmp_path / "clip")
    weights = load_file(tmp_path / "clip" / "model.safetensors")
    del weights["vision_model.post_layernorm.weight"]
    save_file(weights, tmp_path / "clip" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EmbedderError, match=r"embedder.path=.*clip lacks 1 weight\(s\) of the CLIP image tower "
                                            r"\(vision_model.post_layernorm.weight\)"):
        make_embedder(EmbedderConfig("clip", path=str(tmp_path / "clip"), size=32))
