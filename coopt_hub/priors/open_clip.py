"""The open_clip backend: image towers by architecture name with a pretrained tag, an `hf-hub:`
id, a local checkpoint, or a seeded random init. Only the image tower is kept.
"""

from __future__ import annotations

import difflib
import os

import torch

from coopt_hub.errors import ConfigError, PriorError
from coopt_hub.priors.base import (
    HF_HUB_PREFIX,
    Preprocessing,
    Prior,
    PriorSpec,
    first_lines,
    module_prior,
    run_device,
    seeded,
    split_model,
)
from coopt_hub.priors.registry import Backend

LIST_MODELS = "python -c 'import open_clip; print(open_clip.list_models())'"


def check_open_clip(spec: PriorSpec) -> None:
    """An `hf-hub:` model brings its own weights: a tag or a checkpoint besides it would be ignored."""
    if split_model(spec.model)[1].startswith(HF_HUB_PREFIX) and (spec.pretrained or spec.checkpoint):
        raise ConfigError(f"{spec.model} brings its own weights; it takes no --pretrained or --checkpoint.",
                          hint="Drop --pretrained and --checkpoint, or name an open_clip model instead.")


def load_open_clip(spec: PriorSpec, device: str = "cpu", precision: str = "fp32") -> Prior:
    """The image tower of the open_clip model of `spec` on `device`; PriorError says why it cannot be loaded."""
    torch_device = run_device(device, precision)
    model = _create_model(spec)
    visual = model.visual
    del model  # the text tower is never used
    config = visual.preprocess_cfg
    size = config["size"]
    preprocessing = Preprocessing(
        image_size=(size, size) if isinstance(size, int) else tuple(size),
        mean=tuple(config["mean"]), std=tuple(config["std"]), interpolation=config["interpolation"],
        resize_mode=config["resize_mode"], fill_color=config.get("fill_color", 0),
    )
    return module_prior(spec, visual, preprocessing, torch_device, precision)


BACKEND = Backend(load=load_open_clip, check=check_open_clip)


def _create_model(spec: PriorSpec) -> torch.nn.Module:
    import open_clip

    name = split_model(spec.model)[1]
    if ":" not in name and open_clip.get_model_config(name) is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise PriorError(
            f"Unknown open_clip model {name!r}." + (f" Did you mean {', '.join(close)}?" if close else ""),
            hint=f"List the valid names with: {LIST_MODELS}",
        )
    if spec.pretrained and not open_clip.get_pretrained_cfg(name, spec.pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise PriorError(
            f"{name} has no pretrained tag {spec.pretrained!r}; known tags: {', '.join(tags) or 'none'}.",
            hint="Pick one of the tags, or load your own weights with --checkpoint PATH.",
        )
    if spec.checkpoint and not os.path.isfile(spec.checkpoint):
        raise PriorError(f"The checkpoint {spec.checkpoint} does not exist.",
                         hint="Pass the path of a .safetensors, .bin or .pt state dict of the open_clip model.")
    try:
        with seeded(spec.seed):
            return open_clip.create_model(name, pretrained=spec.checkpoint or spec.pretrained,
                                          force_image_size=spec.image_size, device="cpu", precision="fp32")
    except Exception as err:  # open_clip reports every failure as RuntimeError/OSError/ValueError and kin
        raise _creation_error(spec, name, err) from err


def _creation_error(spec: PriorSpec, name: str, err: Exception) -> PriorError:
    """Why open_clip could not create the model, said by where its weights were to come from."""
    import open_clip

    reason = first_lines(err)
    if spec.checkpoint:
        return PriorError(f"The checkpoint {spec.checkpoint} does not fit {name}: {reason}",
                          hint=f"The file must hold a state dict of the whole open_clip {name} model.")
    if spec.pretrained:
        hub_file = open_clip.get_pretrained_cfg(name, spec.pretrained).get("hf_hub", "").rstrip("/")
        return PriorError(
            f"The {spec.pretrained} weights of {name} could not be downloaded: {reason}",
            hint=(f"On a machine with network access download them (`hf download {hub_file}`), "
                  if hub_file else "Download the weights on a machine with network access, ")
            + f"then pass the file with --model {spec.model} --checkpoint PATH.",
        )
    if name.startswith(HF_HUB_PREFIX):
        return PriorError(f"Could not load {spec.model} from the Hub: {reason}",
                          hint="Check the repo id, HF_ENDPOINT and HF_TOKEN, or download the weights and use "
                          "--checkpoint.")
    return PriorError(f"open_clip could not build {name}: {reason}",
                      hint="Try another --image-size, or rerun with --debug for the traceback.")
