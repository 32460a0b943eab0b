"""The timm backend: `timm:ARCH` or `timm:ARCH.TAG` (timm's own names, the pretrained tag after the
dot), or `timm:hf-hub:ORG/NAME`, as pooled features (no classifier). Weights are timm's pretrained
ones (`--pretrained TAG`, or `--pretrained true` for the tag in the name or timm's default), a local
checkpoint, or a seeded random init; the preprocessing is timm's data config for the model.

Published weights on the Hub are downloaded from the weights endpoint (priors.weights) and handed to
timm as local files, so that timm never downloads from HF_ENDPOINT, the collaboration's hub.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch

from coopt_hub.errors import ConfigError, PriorError
from coopt_hub.priors.base import Prior, first_lines, module_prior, run_device, seeded
from coopt_hub.priors.registry import Backend
from coopt_hub.priors.spec import (
    HF_HUB_PREFIX,
    LOCAL_DIR_PREFIX,
    TIMM_CROP_MODES,
    Preprocessing,
    PriorSpec,
    split_model,
)
from coopt_hub.priors.weights import REDOWNLOAD, ModelRepo, fetch_model_files, safetensors_first

LIST_MODELS = "python -c 'import timm; print(timm.list_pretrained())'"
# A timm model repo, as timm reads it: this config and the weights (the file named here, or its
# safetensors twin, model.safetensors).
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "pytorch_model.bin"
# `--pretrained` words meaning "timm's weights for the name as given", rather than a tag.
DEFAULT_WEIGHTS = frozenset({"true", "yes", "1"})


def check_timm(spec: PriorSpec) -> None:
    """A hub model brings its own weights; a tag in the name and another in --pretrained contradict."""
    name = split_model(spec.model)[1]
    if name.startswith(HF_HUB_PREFIX):
        if spec.pretrained or spec.checkpoint:
            raise ConfigError(f"{spec.model} brings its own weights; it takes no --pretrained or --checkpoint.",
                              hint="Drop --pretrained and --checkpoint, or name a timm architecture instead.")
        return
    arch, _, tag = name.partition(".")
    if tag and spec.pretrained and spec.pretrained.lower() not in DEFAULT_WEIGHTS and spec.pretrained != tag:
        raise ConfigError(f"{spec.model} names the pretrained tag {tag!r} and --pretrained another, "
                          f"{spec.pretrained!r}.",
                          hint=f"Name the weights once: --model timm:{arch}.{tag} --pretrained true, "
                          f"or --model timm:{arch} --pretrained TAG.")


def load_timm(spec: PriorSpec, device: str = "cpu", precision: str = "fp32") -> Prior:
    """The timm model of `spec` as pooled features on `device`; PriorError says why it cannot be loaded."""
    torch_device = run_device(device, precision)
    name, pretrained = _timm_name(spec)
    if not name.startswith(HF_HUB_PREFIX):
        _check_known(name, pretrained)
    if spec.checkpoint and not os.path.isfile(spec.checkpoint):
        raise PriorError(f"The checkpoint {spec.checkpoint} does not exist.",
                         hint="Pass the path of a .safetensors, .bin or .pt state dict of the timm model.")
    model = _create_model(spec, name, pretrained)
    if spec.checkpoint:
        _load_checkpoint(model, spec, name)
    return module_prior(spec, model, _preprocessing(model, spec), torch_device, precision)


BACKEND = Backend(load=load_timm, check=check_timm)


def _timm_name(spec: PriorSpec) -> tuple[str, bool]:
    """(the name timm creates, whether timm loads its pretrained weights for it)."""
    name = split_model(spec.model)[1]
    if name.startswith(HF_HUB_PREFIX):
        return name, True
    if not spec.pretrained:
        return name, False
    if spec.pretrained.lower() in DEFAULT_WEIGHTS:
        return name, True
    return f"{name.partition('.')[0]}.{spec.pretrained}", True


def _check_known(name: str, pretrained: bool) -> None:
    """Unknown architectures and tags fail here with the valid names, not deep inside timm."""
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise PriorError(f"Unknown timm model {arch!r}." + (f" Did you mean {', '.join(close)}?" if close else ""),
                         hint=f"List the models timm has weights for (ARCH.TAG) with: {LIST_MODELS}")
    tags = [known.partition(".")[2] for known in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in tags:
        raise PriorError(f"timm's {arch} has no pretrained tag {tag!r}; known tags: {', '.join(tags) or 'none'}.",
                         hint="Pick one of the tags, or load your own weights with --checkpoint PATH.")
    if pretrained and not tags:
        raise PriorError(f"timm publishes no pretrained weights for {arch}.",
                         hint="Load your own weights with --checkpoint PATH, or leave out --pretrained.")


def _create_model(spec: PriorSpec, name: str, pretrained: bool) -> torch.nn.Module:
    import timm

    options = {"num_classes": 0}  # the pooled features, without a classifier
    if spec.image_size is not None and _fixed_input_size(name):
        # Only models built for one input size take img_size (a ViT's position embedding);
        # the others run at any size, which the preprocessing alone sets.
        options["img_size"] = spec.image_size
    created, local = name, None  # local: the downloaded folder or file of the weights
    if name.startswith(HF_HUB_PREFIX):
        local = str(_hub_model_folder(spec, name[len(HF_HUB_PREFIX):]))
        created = f"{LOCAL_DIR_PREFIX}{local}"
    elif pretrained:
        options["pretrained_cfg_overlay"] = pretrained_overlay(name)
        local = options["pretrained_cfg_overlay"].get("file")
    try:
        with seeded(spec.seed):
            return timm.create_model(created, pretrained=pretrained, **options)
    except TypeError as err:
        if "img_size" not in str(err):
            raise _creation_error(spec, name, local, err) from err
        raise PriorError(f"timm builds {spec.model} without an img_size setting: --image-size cannot change "
                         "its input size.",
                         hint="Leave out --image-size (the model's data config sets the size), or pick a timm "
                         "model that takes one (ViTs do).") from err
    except Exception as err:  # timm and torch fail with RuntimeError, OSError and kin
        raise _creation_error(spec, name, local, err) from err


def pretrained_overlay(name: str) -> dict[str, Any]:
    """timm's `pretrained_cfg_overlay` that loads the pretrained weights of `name` (ARCH or ARCH.TAG)
    from a local file, downloaded from the weights endpoint (priors.weights): pass it to
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=...)`. Empty for weights timm
    publishes at a plain URL only, which timm downloads itself.
    """
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    if config is None or not config.hf_hub_id:
        return {}
    repo_id, _, revision = config.hf_hub_id.partition("@")
    repo = ModelRepo(repo_id, revision=revision or None,
                     failed=f"The {config.tag} weights of timm's {config.architecture} could not be downloaded",
                     local_copy=f"--model timm:{config.architecture}.{config.tag} --checkpoint PATH")
    files = fetch_model_files(repo, safetensors_first(config.hf_hub_filename or TIMM_WEIGHTS))
    # A file in a format of the model's own ("custom_load": "hf") goes through model.load_pretrained;
    # timm would otherwise read every file as a state dict.
    return {"file": str(files.weights), "custom_load": config.custom_load == "hf" and bool(config.hf_hub_filename)}


def _hub_model_folder(spec: PriorSpec, model_id: str) -> Path:
    """The local folder of a timm model repo (`ORG/NAME` or `ORG/NAME@REVISION`): config.json and weights."""
    repo_id, _, revision = model_id.partition("@")
    repo = ModelRepo(repo_id, failed=f"Could not load {spec.model}", revision=revision or None)
    return fetch_model_files(repo, safetensors_first(TIMM_WEIGHTS), config=TIMM_CONFIG).folder


def _fixed_input_size(name: str) -> bool:
    """Whether the model runs at one input size only; a hub model's config is not known before it loads."""
    from timm.models import get_pretrained_cfg

    config = None if name.startswith(HF_HUB_PREFIX) else get_pretrained_cfg(name)
    return config is None or bool(config.fixed_input_size)


def _creation_error(spec: PriorSpec, name: str, local: str | None, err: Exception) -> PriorError:
    """Why timm could not create the model, said by where its weights came from."""
    from timm.models import get_pretrained_cfg

    reason = first_lines(err)
    if name.startswith(HF_HUB_PREFIX):
        return PriorError(f"timm could not build {spec.model} from its files ({local}): {reason}",
                          hint=f"The repo must hold a timm model: {TIMM_CONFIG} (with its architecture) and its "
                          "weights, as timm's push_to_hf_hub writes them.")
    if spec.pretrained:
        config = get_pretrained_cfg(name)
        weights = f"{config.architecture}.{config.tag}"
        if local:  # downloaded already (priors.weights): the file itself failed
            return PriorError(f"The {config.tag} weights of timm's {config.architecture} ({local}) do not load: "
                              f"{reason}",
                              hint=REDOWNLOAD)
        return PriorError(
            f"The {config.tag} weights of timm's {config.architecture} could not be downloaded from "
            f"{config.url}: {reason}",
            hint=f"Download the file on a machine with network access, then pass it with --model timm:{weights} "
            "--checkpoint PATH.",
        )
    return PriorError(f"timm could not build {name}: {reason}",
                      hint="Try another --image-size, or rerun with --debug for the traceback.")


def _load_checkpoint(model: torch.nn.Module, spec: PriorSpec, name: str) -> None:
    from timm.models import load_checkpoint

    try:
        load_checkpoint(model, spec.checkpoint, strict=True, filter_fn=_without_classifier)
    except Exception as err:  # torch, safetensors and timm each fail in their own way on a wrong file
        raise PriorError(
            f"The checkpoint {spec.checkpoint} does not fit {spec.model}: {first_lines(err)}",
            hint=f"The file must hold a state dict of timm's {name.partition('.')[0]} (such as the "
            "model.safetensors of its timm repo on the Hub), made at the input size it runs at here.",
        ) from err


def _without_classifier(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint of the classifying model fits the feature model: the classifier's weights are left out."""
    classifiers = model.pretrained_cfg.get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    unused = {f"{layer}.{part}" for layer in classifiers for part in ("weight", "bias")} - set(model.state_dict())
    return {key: value for key, value in state_dict.items() if key not in unused}


def _preprocessing(model: torch.nn.Module, spec: PriorSpec) -> Preprocessing:
    """timm's data config of the model (with --image-size as its input size), as a record."""
    from timm.data import resolve_data_config

    size = spec.image_size
    config = resolve_data_config({"input_size": (3, size, size)} if size else {}, model=model)
    crop_mode = config.get("crop_mode", "center")
    if crop_mode not in TIMM_CROP_MODES:
        raise PriorError(f"{spec.model} preprocesses with timm's crop mode {crop_mode!r}, which coopt-hub cannot "
                         f"reproduce (it does {', '.join(TIMM_CROP_MODES)}).",
                         hint="Pick another timm model or pretrained tag; most crop at the 'center'.")
    _, height, width = config["input_size"]
    return Preprocessing(image_size=(height, width), mean=tuple(config["mean"]), std=tuple(config["std"]),
                         interpolation=config["interpolation"], resize_mode=TIMM_CROP_MODES[crop_mode],
                         crop_pct=float(config["crop_pct"]))
