from pathlib import Path

import huggingface_hub.constants
import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from coopt_hub.errors import ConfigError, PriorError
from coopt_hub.priors import Preprocessing, Prior, PriorSpec, load_prior
from coopt_hub.priors.base import ModulePrior
from coopt_hub.priors.registry import check_spec

# Two small architectures with different output sizes, at a tiny input size to keep tests fast.
SMALL = PriorSpec(model="ViT-S-32", seed=3, image_size=32)
MEDIUM = PriorSpec(model="ViT-M-32", seed=3, image_size=64)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # huggingface_hub reads this on every request: nothing here may wait on the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def small() -> Prior:
    return load_prior(SMALL)


def random_pixels(prior: Prior, batch: int = 4) -> torch.Tensor:
    height, width = prior.preprocessing.image_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def test_two_architectures_record_what_they_are(small: Prior):
    medium = load_prior(MEDIUM)
    assert isinstance(small, ModulePrior) and small.random_init
    assert (small.output_dim, medium.output_dim) == (384, 512)
    assert small.preprocessing.image_size == (32, 32) and medium.preprocessing.image_size == (64, 64)
    assert small.preprocessing.resize_mode == "shortest" and small.preprocessing.interpolation == "bicubic"
    assert len(small.preprocessing.mean) == 3 and len(small.preprocessing.std) == 3
    assert small.fingerprint != medium.fingerprint and len(small.fingerprint) == 64
    for prior in (small, medium):
        out = prior.encode_batch(random_pixels(prior))
        assert out.dtype == torch.float32 and out.shape == (4, prior.output_dim)
        assert torch.isfinite(out).all()


def test_same_seed_same_weights_other_seed_other_weights(small: Prior):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = load_prior(SMALL)
    assert torch.equal(torch.rand(3), expected_draw), "loading must leave the caller's random state alone"
    assert again.fingerprint == small.fingerprint
    assert torch.equal(again.encode_batch(random_pixels(again)), small.encode_batch(random_pixels(small)))
    other = load_prior(PriorSpec(model="ViT-S-32", seed=4, image_size=32))
    assert other.fingerprint != small.fingerprint


def test_own_checkpoint_gives_the_same_prior(small: Prior, tmp_path: Path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SMALL.seed)
        model = open_clip.create_model("ViT-S-32", force_image_size=32)
    path = tmp_path / "vit-s-32.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_prior(PriorSpec(model="ViT-S-32", checkpoint=str(path), image_size=32))
    assert not loaded.random_init
    assert loaded.fingerprint == small.fingerprint
    assert torch.equal(loaded.encode_batch(random_pixels(loaded)), small.encode_batch(random_pixels(small)))


def test_checkpoint_of_another_model_is_refused(tmp_path: Path):
    path = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(512, 512), "text_projection": torch.zeros(512, 512)}, str(path))
    with pytest.raises(PriorError, match="does not fit ViT-S-32") as info:
        load_prior(PriorSpec(model="ViT-S-32", checkpoint=str(path), image_size=32))
    assert "whole open_clip" in info.value.hint


def test_missing_checkpoint(tmp_path: Path):
    with pytest.raises(PriorError, match="does not exist"):
        load_prior(PriorSpec(model="ViT-S-32", checkpoint=str(tmp_path / "nope.safetensors")))


def test_unknown_model_points_to_the_list():
    with pytest.raises(PriorError, match="Unknown open_clip model 'ViT-S-33'.*ViT-S-32") as info:
        load_prior(PriorSpec(model="ViT-S-33"))
    assert "open_clip.list_models()" in info.value.hint


def test_input_size_the_model_cannot_take():
    with pytest.raises(PriorError, match="ViT-S-32 does not run on 16x16 images") as info:
        load_prior(PriorSpec(model="ViT-S-32", image_size=16))
    assert "--image-size" in info.value.hint


def test_pretrained_weights_that_cannot_be_downloaded():
    with pytest.raises(PriorError, match="could not be downloaded") as info:
        load_prior(PriorSpec(model="ViT-B-32", pretrained="openai"))
    assert "--checkpoint" in info.value.hint and "timm/vit_base_patch32_clip_224.openai" in info.value.hint
    with pytest.raises(PriorError, match="no pretrained tag 'nonsense'"):
        load_prior(PriorSpec(model="ViT-B-32", pretrained="nonsense"))


def test_hub_model_that_cannot_be_fetched():
    with pytest.raises(PriorError, match="Could not load hf-hub:nobody/nothing"):
        load_prior(PriorSpec(model="hf-hub:nobody/nothing"))


@pytest.mark.parametrize("make, words", [
    (lambda: PriorSpec(model="ViT-S-32", pretrained="openai", checkpoint="x.pt"), "not both"),
    (lambda: check_spec(PriorSpec(model="hf-hub:a/b", checkpoint="x.pt")), "brings its own weights"),
    (lambda: load_prior(PriorSpec(model="hf-hub:a/b", pretrained="openai")), "brings its own weights"),
    (lambda: PriorSpec(model="ViT-S-32", image_size=0), "image size"),
    (lambda: load_prior(SMALL, precision="fp8"), "Unknown precision"),
    (lambda: load_prior(SMALL, device="cpu", precision="fp16"), "fp16 needs a CUDA device"),
    (lambda: load_prior(SMALL, device="toaster"), "Unknown device"),
    (lambda: PriorSpec.from_dict({"model": "ViT-S-32", "colour": 1}), "Unknown prior settings"),
])
def test_bad_settings(make, words):
    with pytest.raises(ConfigError, match=words):
        make()


def test_preprocess_handles_grayscale_and_odd_sizes(small: Prior):
    gray = PIL.Image.fromarray(np.arange(40 * 50, dtype=np.uint8).reshape(40, 50), mode="L")
    pixels = small.preprocess(gray)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 32, 32)
    mean, std = torch.tensor(small.preprocessing.mean), torch.tensor(small.preprocessing.std)
    channels = pixels * std[:, None, None] + mean[:, None, None]
    assert torch.allclose(channels[0], channels[1], atol=1e-5) and torch.allclose(channels[0], channels[2], atol=1e-5)
    assert small.encode_batch(pixels[None]).shape == (1, 384)


def test_bf16_on_cpu_is_close_to_fp32(small: Prior):
    fast = load_prior(SMALL, precision="bf16")
    assert fast.fingerprint == small.fingerprint
    pixels = random_pixels(small)
    out, reference = fast.encode_batch(pixels), small.encode_batch(pixels)
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, reference).min() > 0.98


def test_records_round_trip(small: Prior):
    assert PriorSpec.from_dict(small.spec.to_dict()) == small.spec
    assert Preprocessing.from_dict(small.preprocessing.to_dict()) == small.preprocessing


def test_a_fake_prior_only_needs_encode_batch():
    class Constant(Prior):
        def __init__(self):
            self.spec = PriorSpec(model="fake")
            self.preprocessing = Preprocessing(image_size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3,
                                               interpolation="bilinear", resize_mode="squash")
            self.output_dim, self.fingerprint, self.random_init = 2, "0" * 64, False

        def encode_batch(self, pixels):
            return torch.ones(pixels.shape[0], 2)

    fake = Constant()
    assert fake.preprocess(PIL.Image.new("RGB", (20, 10))).shape == (3, 8, 8)
