import pytest
import torch

from align.config import ModelConfig
from align.models.clip import PROJECT_MODELS, ModelLoadError, build_clip


@pytest.mark.parametrize("name", PROJECT_MODELS)
def test_project_models_build_offline_and_encode(name):
    clip = build_clip(ModelConfig(name=name))
    tokens = clip.tokenizer(["a red star", "a blurry photo of a blue ring"])
    assert tokens.shape == (2, clip.context_length)
    with torch.no_grad():
        text = clip.model.encode_text(tokens)
        image = clip.model.encode_image(torch.rand(2, 3, clip.image_size, clip.image_size))
    assert text.shape == image.shape == (2, clip.embed_dim)
    assert torch.isfinite(text).all() and torch.isfinite(image).all()


def test_real_model_names_keep_open_clip_configs():
    clip = build_clip(ModelConfig(name="ViT-B-32"))  # no pretrained tag: random init, no download
    assert clip.embed_dim == 512 and clip.image_size == 224 and clip.context_length == 77


def test_unknown_model_and_missing_checkpoint_fail_fast(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model name 'tiny-cilp'"):
        build_clip(ModelConfig(name="tiny-cilp"))
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        build_clip(ModelConfig(name="micro-clip", pretrained=str(tmp_path / "missing.pt")))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        build_clip(ModelConfig(name="micro-clip", pretrained=str(junk)))


def test_checkpoint_path_round_trip(tmp_path):
    clip = build_clip(ModelConfig(name="micro-clip"))
    path = tmp_path / "micro.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = build_clip(ModelConfig(name="micro-clip", pretrained=str(path)))
    pairs = zip(clip.model.state_dict().items(), loaded.model.state_dict().items(), strict=True)
    for (k, a), (_, b) in pairs:
        assert torch.equal(a, b), k


def test_project_models_build_inside_ray_workers(ray_session):
    """Registration happens where the model is built, so a fresh worker process can build it."""

    @ray_session.remote
    def build_in_worker(name):
        return build_clip(ModelConfig(name=name)).embed_dim

    assert ray_session.get(build_in_worker.remote("tiny-clip")) == 128


def test_random_init_is_the_same_in_every_process(ray_session):
    @ray_session.remote
    def first_weights():
        return build_clip(ModelConfig(name="micro-clip")).model.token_embedding.weight[:2].clone()

    here = build_clip(ModelConfig(name="micro-clip")).model.token_embedding.weight[:2]
    assert torch.equal(ray_session.get(first_weights.remote()), here)


def test_exported_checkpoint_loads_with_open_clip_and_keeps_the_weights(tmp_path):
    import open_clip

    from align.models.clip import export_checkpoint

    model = build_clip(ModelConfig(name="micro-clip")).model
    with torch.no_grad():
        model.logit_scale.fill_(3.0)

    class Wrapper(torch.nn.Module):  # keys gain "module.", as under DDP or DeepSpeed
        def __init__(self, module):
            super().__init__()
            self.module = module

    export_checkpoint(Wrapper(model), str(tmp_path / "m.pt"))
    loaded = open_clip.create_model("micro-clip", pretrained=str(tmp_path / "m.pt"))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_image_tower_digest_follows_the_image_weights_alone(tmp_path):
    """Another text tower, the same digest (a fine-tune with finetune.lock_image); one image
    weight moved, another; a checkpoint's digest is the digest of the model it holds."""
    from align.models.clip import export_checkpoint, image_tower_digest

    seeded = ModelConfig(name="micro-clip")
    model = build_clip(seeded).model
    base = tmp_path / "base.pt"
    torch.save(model.state_dict(), base)
    digest = image_tower_digest(seeded)
    assert digest == image_tower_digest(ModelConfig(name="micro-clip", pretrained=str(base)))
    with torch.no_grad():
        model.text_projection.add_(1.0)
        model.logit_scale.fill_(2.0)
    export_checkpoint(model, str(tmp_path / "text.pt"))  # {"state_dict": ...}, as jobs export
    assert digest == image_tower_digest(
        ModelConfig(name="micro-clip", pretrained=str(tmp_path / "text.pt"))
    )
    with torch.no_grad():
        next(model.visual.parameters()).view(-1)[0] += 1e-3
    export_checkpoint(model, str(tmp_path / "image.pt"))
    assert digest != image_tower_digest(
        ModelConfig(name="micro-clip", pretrained=str(tmp_path / "image.pt"))
    )
