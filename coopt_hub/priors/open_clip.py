"""The open_clip backend: image towers by architecture name with a pretrained tag, an `hf-hub:`
id, a local checkpoint, or a seeded random init. Only the image tower is kept.

Published weights (a tag's, an `hf-hub:` repo's) are downloaded from the weights endpoint
(priors.weights) and handed to open_clip as local files, so that open_clip never downloads from
HF_ENDPOINT, the collaboration's hub.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from coopt_hub.errors import ConfigError, PriorError
from coopt_hub.priors.base import Prior, first_lines, module_prior, run_device, seeded
from coopt_hub.priors.registry import Backend
from coopt_hub.priors.spec import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, Preprocessing, PriorSpec, split_model
from coopt_hub.priors.weights import REDOWNLOAD, ModelRepo, fetch_model_files, safetensors_first

LIST_MODELS = "python -c 'import open_clip; print(open_clip.list_models())'"
# An `hf-hub:ORG/NAME` repo, as open_clip reads it: this config and the weights (the file named here,
# or its safetensors twin, open_clip_model.safetensors).
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"
# What a pretrained tag sets of the preprocessing; the input size stays the model's.
TAG_PREPROCESSING = ("mean", "std", "interpolation", "resize_mode")


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
    weights = _local_weights(spec, name)
    try:
        with seeded(spec.seed), _root_log_kept_from(open_clip):
            return open_clip.create_model(weights.model_name, pretrained=weights.pretrained,
                                          force_image_size=spec.image_size, force_preprocess_cfg=weights.preprocessing,
                                          device="cpu", precision="fp32")
    except Exception as err:  # open_clip reports every failure as RuntimeError/OSError/ValueError and kin
        raise _creation_error(spec, name, weights, err) from err


@dataclass(frozen=True)
class _LocalWeights:
    """What open_clip.create_model is given for the weights of a spec, every file of it local."""

    model_name: str  # a name of open_clip's, or `local-dir:FOLDER` for an `hf-hub:` model fetched into FOLDER
    pretrained: str | None = None  # a weights file
    # A pretrained tag's preprocessing (mean, std, ...): open_clip takes it from the tag, never from a file.
    preprocessing: dict | None = None


def _local_weights(spec: PriorSpec, name: str) -> _LocalWeights:
    """The weights of `spec` as local files, downloaded from the weights endpoint (priors.weights) if need be."""
    import open_clip

    if spec.checkpoint:
        return _LocalWeights(name, spec.checkpoint)
    if name.startswith(HF_HUB_PREFIX):
        repo = ModelRepo(name[len(HF_HUB_PREFIX):], failed=f"Could not load {spec.model}")
        files = fetch_model_files(repo, safetensors_first(OPEN_CLIP_WEIGHTS), config=OPEN_CLIP_CONFIG)
        return _LocalWeights(f"{LOCAL_DIR_PREFIX}{files.folder}")
    if not spec.pretrained:
        return _LocalWeights(name)
    tag = open_clip.get_pretrained_cfg(name, spec.pretrained)
    # Every tag names its file on the Hub: 'org/name/' (open_clip's default file) or 'org/name/file.bin'.
    repo_id, filename = os.path.split(tag["hf_hub"])
    repo = ModelRepo(repo_id, failed=f"The {spec.pretrained} weights of {name} could not be downloaded",
                     local_copy=f"--model {spec.model} --checkpoint PATH")
    files = fetch_model_files(repo, safetensors_first(filename or OPEN_CLIP_WEIGHTS))
    return _LocalWeights(name, str(files.weights), {key: tag[key] for key in TAG_PREPROCESSING if key in tag})


@contextlib.contextmanager
def _root_log_kept_from(library: ModuleType):
    """Keep what `library` logs on the root logger off stderr while it runs.

    open_clip logs with `logging.error(...)`, and the root logger, unconfigured, then configures itself
    to print `ERROR:root:...`: each failure it goes on to raise would be shown twice, and every random
    init announced as a warning. The error coopt-hub raises says what those lines say.
    """
    folder = os.path.dirname(library.__file__) + os.sep
    root = logging.getLogger()
    keep_out = _NotFrom(folder)
    # A handler of our own keeps logging from configuring the root logger for the library's record.
    placeholder = None if root.handlers else logging.NullHandler()
    root.addFilter(keep_out)
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeFilter(keep_out)
        if placeholder is not None:
            root.removeHandler(placeholder)


class _NotFrom(logging.Filter):
    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(self.folder)


def _creation_error(spec: PriorSpec, name: str, weights: _LocalWeights, err: Exception) -> PriorError:
    """Why open_clip could not create the model from local weights, said by where they came from."""
    reason = first_lines(err)
    if spec.checkpoint:
        return PriorError(f"The checkpoint {spec.checkpoint} does not fit {name}: {reason}",
                          hint=f"The file must hold a state dict of the whole open_clip {name} model.")
    if spec.pretrained:
        return PriorError(f"The {spec.pretrained} weights of {name} ({weights.pretrained}) do not load: {reason}",
                          hint=REDOWNLOAD)
    if name.startswith(HF_HUB_PREFIX):
        folder = weights.model_name[len(LOCAL_DIR_PREFIX):]
        return PriorError(f"open_clip could not build {spec.model} from its files ({folder}): {reason}",
                          hint=f"The repo must hold an open_clip model: {OPEN_CLIP_CONFIG} (with model_cfg) and its "
                          "weights, as open_clip's push_to_hf_hub writes them.")
    return PriorError(f"open_clip could not build {name}: {reason}",
                      hint="Try another --image-size, or rerun with --debug for the traceback.")
