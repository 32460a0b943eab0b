"""The open_clip backend: image towers by architecture name with a pretrained tag, an `hf-hub:`
id, a local checkpoint, or a seeded random init.
"""

from __future__ import annotations

import difflib
import os

import torch

from coopt_hub.errors import PriorError
from coopt_hub.priors.base import (
    _LIST_MODELS,
    HF_HUB_PREFIX,
    Preprocessing,
    Prior,
    PriorSpec,
    _autocast,
    _check_precision,
    _fingerprint,
    _parse_device,
)


class OpenClipPrior(Prior):
    """The image tower of an open_clip model, in eval mode, weights in fp32 (autocast for bf16/fp16)."""

    def __init__(self, spec: PriorSpec, visual: torch.nn.Module, preprocessing: Preprocessing, output_dim: int,
                 fingerprint: str, device: torch.device, precision: str):
        self.spec = spec
        self.preprocessing = preprocessing
        self.output_dim = output_dim
        self.fingerprint = fingerprint
        self.random_init = spec.random_init
        self.device = device
        self.precision = precision
        self._visual = visual

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = self.preprocessing.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, height, width):
            raise ValueError(f"Expected pixels of shape [B, 3, {height}, {width}], got {list(pixels.shape)}.")
        with torch.inference_mode(), _autocast(self.device, self.precision):
            features = self._visual(pixels.to(self.device, torch.float32))
        return features.float().cpu()


def _create_open_clip_model(spec: PriorSpec) -> torch.nn.Module:
    import open_clip

    is_hub_model = spec.model.startswith(HF_HUB_PREFIX)
    if ":" not in spec.model and open_clip.get_model_config(spec.model) is None:
        close = difflib.get_close_matches(spec.model, open_clip.list_models(), n=3)
        raise PriorError(
            f"Unknown open_clip model {spec.model!r}." + (f" Did you mean {', '.join(close)}?" if close else ""),
            hint=f"List the valid names with: {_LIST_MODELS}",
        )
    if spec.pretrained and not open_clip.get_pretrained_cfg(spec.model, spec.pretrained):
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        raise PriorError(
            f"{spec.model} has no pretrained tag {spec.pretrained!r}; known tags: {', '.join(tags) or 'none'}.",
            hint="Pick one of the tags, or load your own weights with --checkpoint PATH.",
        )
    if spec.checkpoint and not os.path.isfile(spec.checkpoint):
        raise PriorError(f"The checkpoint {spec.checkpoint} does not exist.",
                         hint="Pass the path of a .safetensors, .bin or .pt state dict of the open_clip model.")
    weights = spec.checkpoint or spec.pretrained
    try:
        # Created on the CPU under a forked RNG: the seed alone fixes random weights, on any device,
        # without disturbing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            return open_clip.create_model(spec.model, pretrained=weights, force_image_size=spec.image_size,
                                          device="cpu", precision="fp32")
    except Exception as err:  # open_clip reports every failure as RuntimeError/OSError/ValueError and kin
        reason = _first_lines(err)
        if spec.checkpoint:
            raise PriorError(
                f"The checkpoint {spec.checkpoint} does not fit {spec.model}: {reason}",
                hint=f"The file must hold a state dict of the whole open_clip {spec.model} model.",
            ) from err
        if spec.pretrained:
            hub_file = open_clip.get_pretrained_cfg(spec.model, spec.pretrained).get("hf_hub", "").rstrip("/")
            raise PriorError(
                f"The {spec.pretrained} weights of {spec.model} could not be downloaded: {reason}",
                hint=(f"On a machine with network access download them (`hf download {hub_file}`), "
                      if hub_file else "Download the weights on a machine with network access, ")
                + f"then pass the file with --model {spec.model} --checkpoint PATH.",
            ) from err
        if is_hub_model:
            raise PriorError(
                f"Could not load {spec.model} from the Hub: {reason}",
                hint="Check the repo id, HF_ENDPOINT and HF_TOKEN, or download the weights and use --checkpoint.",
            ) from err
        raise PriorError(f"open_clip could not build {spec.model}: {reason}",
                         hint="Try another --image-size, or rerun with --debug for the traceback.") from err






def load_open_clip(spec: PriorSpec, device: str = "cpu", precision: str = "fp32") -> Prior:
    """Build the prior of `spec` on `device`; PriorError says why a model cannot be loaded."""
    torch_device = _parse_device(device)
    _check_precision(precision, torch_device)
    model = _create_open_clip_model(spec)
    visual = model.visual
    del model  # the text tower is never used
    visual.eval().requires_grad_(False)
    config = visual.preprocess_cfg
    size = config["size"]
    preprocessing = Preprocessing(
        image_size=(size, size) if isinstance(size, int) else tuple(size),
        mean=tuple(config["mean"]), std=tuple(config["std"]), interpolation=config["interpolation"],
        resize_mode=config["resize_mode"], fill_color=config.get("fill_color", 0),
    )
    fingerprint = _fingerprint(visual)  # before the move, so fp32 CPU weights are hashed on every machine
    visual = visual.to(torch_device)
    try:
        # Not every open_clip tower exposes its output size (timm ones do not); one probe forward
        # finds it, and shows now rather than mid-shard that the model runs at this input size.
        with torch.inference_mode(), _autocast(torch_device, precision):
            probe = visual(torch.zeros(1, 3, *preprocessing.image_size, device=torch_device))
    except RuntimeError as err:
        raise PriorError(
            f"{spec.model} does not run on {preprocessing.image_size[0]}x{preprocessing.image_size[1]} images: "
            f"{_first_lines(err)}",
            hint="Pick another --image-size (at least the model's patch size), or leave it at the model's default.",
        ) from err
    return OpenClipPrior(spec, visual, preprocessing, probe.shape[-1], fingerprint, torch_device, precision)


def _first_lines(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."
