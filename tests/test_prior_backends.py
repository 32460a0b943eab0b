"""Prior backends: the registry (names, registration, the `coopt_hub.priors` entry-point group) and
the timm backend with a tiny real model (timm's resnet10t, random init, offline), end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import PIL.Image
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from coopt_hub.core.layout import TARGETS_FILE, shard_prefix
from coopt_hub.errors import ConfigError, PriorError
from coopt_hub.participant.job import load_job_prior, optimize_shard
from coopt_hub.priors import Preprocessing, Prior, PriorSpec, load_prior
from coopt_hub.priors.base import ModulePrior, fingerprint_weights
from coopt_hub.priors.registry import (
    Backend,
    backend,
    backend_names,
    check_spec,
    register_backend,
    split_model,
    unregister_backend,
)

# The CLI builds seed 0 from `--model timm:resnet10t --image-size 32`.
TINY = PriorSpec(model="timm:resnet10t", image_size=32)
TINY_ARGS = ["--model", "timm:resnet10t", "--image-size", "32"]


@pytest.fixture(autouse=True)
def offline(request, monkeypatch):
    """No model here comes from the network; only the tests on a collaboration talk, to the embedded hub."""
    if "collab" not in request.fixturenames:
        # huggingface_hub reads this on every request.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny() -> Prior:
    return load_prior(TINY)


def timm_model(num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
    """resnet10t as the backend builds it from a seed, for tests that compare against timm itself."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("resnet10t", num_classes=num_classes)


def random_pixels(prior: Prior, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, *prior.preprocessing.image_size, generator=torch.Generator().manual_seed(0))


def photo(width: int = 50, height: int = 37) -> PIL.Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


# Names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, expected", [
    ("ViT-B-32", ("open_clip", "ViT-B-32")),
    ("hf-hub:org/name", ("open_clip", "hf-hub:org/name")),
    ("local-dir:/models/clip", ("open_clip", "local-dir:/models/clip")),
    ("open_clip:ViT-B-32", ("open_clip", "ViT-B-32")),
    ("timm:vit_small_patch14_dinov2.lvd142m", ("timm", "vit_small_patch14_dinov2.lvd142m")),
    ("timm:hf-hub:org/name", ("timm", "hf-hub:org/name")),
    ("mine:x:y", ("mine", "x:y")),
])
def test_split_model_reads_every_name_form(model, expected):
    assert split_model(model) == expected


@pytest.mark.parametrize("model", ["", "timm:", "open_clip:"])
def test_a_backend_prefix_alone_is_no_model_name(model):
    with pytest.raises(ConfigError, match="needs a model name"):
        PriorSpec(model)


def test_hub_names_bring_their_weights_in_every_backend():
    assert PriorSpec("timm:resnet10t").random_init, "a bare architecture is a random init"
    assert not PriorSpec("timm:hf-hub:org/name").random_init, "timm:hf-hub: names their weights"
    assert not PriorSpec("hf-hub:org/name").random_init, "open_clip's hf-hub: names their weights"
    assert not PriorSpec("timm:resnet10t", pretrained="true").random_init, "--pretrained true loads weights"


def test_built_in_backends_come_from_the_entry_point_group():
    assert {"open_clip", "timm"} <= set(backend_names())
    assert isinstance(backend("timm"), Backend) and isinstance(backend("open_clip"), Backend)


# Registration ----------------------------------------------------------------------------------------


class Constant(Prior):
    def __init__(self, spec: PriorSpec, value: float = 1.0):
        self.spec, self.output_dim, self.fingerprint, self.random_init = spec, 2, f"{value:064.0f}", False
        self.preprocessing = Preprocessing(image_size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3,
                                           interpolation="bilinear", resize_mode="squash")
        self.value = value

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.full((pixels.shape[0], 2), self.value)


@pytest.fixture
def backend_name():
    """A backend name no other test uses, unregistered afterwards."""
    name = f"const_{uuid.uuid4().hex[:8]}"
    yield name
    unregister_backend(name)


def test_a_registered_function_loads_its_names(backend_name):
    register_backend(backend_name, lambda spec, device, precision: Constant(spec))
    prior = load_prior(PriorSpec(f"{backend_name}:anything"))
    assert isinstance(prior, Constant) and prior.spec.model == f"{backend_name}:anything"
    assert backend_name in backend_names()


def test_a_registered_backend_checks_the_spec_before_loading(backend_name):
    loaded = []

    def refuse_tags(spec: PriorSpec) -> None:
        if spec.pretrained:
            raise ConfigError("no tags here", hint="drop --pretrained")

    register_backend(backend_name, Backend(load=lambda *args: loaded.append(args) or Constant(args[0]),
                                           check=refuse_tags))
    with pytest.raises(ConfigError, match="no tags here"):
        load_prior(PriorSpec(f"{backend_name}:x", pretrained="v1"))
    assert loaded == [], "the backend loaded a spec its check refused"
    assert check_spec(PriorSpec(f"{backend_name}:x")) is backend(backend_name)


def test_registration_errors(backend_name):
    register_backend(backend_name, lambda spec, device, precision: Constant(spec))
    with pytest.raises(ConfigError, match="registered already") as twice:
        register_backend(backend_name, lambda spec, device, precision: Constant(spec, 2.0))
    assert "replace=True" in twice.value.hint
    register_backend(backend_name, lambda spec, device, precision: Constant(spec, 2.0), replace=True)
    assert load_prior(PriorSpec(f"{backend_name}:x")).value == 2.0, "replace=True did not replace"
    for bad_name in ("hf-hub", "my backend", "", "2fast"):
        with pytest.raises(ConfigError, match="must be an identifier"):
            register_backend(bad_name, lambda spec, device, precision: Constant(spec))
    with pytest.raises(ConfigError, match="neither a Backend nor a function"):
        register_backend(f"{backend_name}_x", "not a backend")


def test_a_registered_backend_shadows_a_built_in_one_until_unregistered():
    register_backend("timm", lambda spec, device, precision: Constant(spec), replace=True)
    try:
        assert isinstance(load_prior(PriorSpec("timm:whatever")), Constant)
    finally:
        unregister_backend("timm")
    assert backend("timm").load.__module__ == "coopt_hub.priors.timm", "the entry point is not back"


def test_an_unknown_backend_names_the_known_ones():
    with pytest.raises(PriorError, match=r"No prior backend 'nosuchbackend'; known: .*open_clip.*timm") as info:
        load_prior(PriorSpec("nosuchbackend:x"))
    assert "coopt_hub.priors" in info.value.hint


# A third-party backend, installed as a package with an entry point -----------------------------------

PLUGIN = '''
import hashlib

import torch

from coopt_hub.errors import ConfigError
from coopt_hub.priors import Backend, Preprocessing, Prior
from coopt_hub.priors.registry import split_model


class CellMeans(Prior):
    """The mean colour of each cell of a GRID x GRID grid: `--model mine:GRID`."""

    def __init__(self, spec):
        self.spec = spec
        self.grid = int(split_model(spec.model)[1])
        self.preprocessing = Preprocessing(image_size=(12, 12), mean=(0.5,) * 3, std=(0.5,) * 3,
                                           interpolation="bilinear", resize_mode="squash")
        self.output_dim = 3 * self.grid * self.grid
        self.fingerprint = hashlib.sha256(f"cell-means-{self.grid}".encode()).hexdigest()
        self.random_init = False

    def encode_batch(self, pixels):
        return torch.nn.functional.adaptive_avg_pool2d(pixels, self.grid).flatten(1).float()


def load(spec, device, precision):
    return CellMeans(spec)


def check(spec):
    if spec.pretrained or spec.checkpoint:
        raise ConfigError("mine models have no weights.", hint="Drop --pretrained and --checkpoint.")


BACKEND = Backend(load=load, check=check)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> tuple[Path, str]:
    """(directory, module): a package on disk declaring `mine` (a Backend), `mine_fn` (a bare load
    function) and `mine_broken` (a module that does not exist) in the `coopt_hub.priors` group."""
    directory = tmp_path_factory.mktemp("site")
    module = f"mine_backend_{uuid.uuid4().hex[:8]}"
    (directory / f"{module}.py").write_text(PLUGIN)
    info = directory / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[coopt_hub.priors]\nmine = {module}:BACKEND\nmine_fn = {module}:load\nmine_broken = no_such_module:X\n")
    return directory, module


def test_an_entry_point_backend_is_picked_up_by_load_prior(plugin, monkeypatch):
    directory, module = plugin
    assert "mine" not in backend_names()
    monkeypatch.syspath_prepend(str(directory))
    assert {"mine", "mine_fn", "mine_broken"} <= set(backend_names())
    prior = load_prior(PriorSpec("mine:2"))
    assert type(prior).__module__ == module and prior.output_dim == 12
    assert prior.encode_batch(prior.preprocess(photo())[None]).shape == (1, 12)
    assert load_prior(PriorSpec("mine_fn:3")).output_dim == 27, "a bare load function is a backend too"
    with pytest.raises(ConfigError, match="mine models have no weights"):
        load_prior(PriorSpec("mine:2", pretrained="v1"))
    with pytest.raises(PriorError, match=r"'mine_broken' \(no_such_module:X\) cannot be imported") as broken:
        load_prior(PriorSpec("mine_broken:1"))
    assert "Reinstall" in broken.value.hint


# The timm backend --------------------------------------------------------------------------------------


def test_tiny_timm_model_loads_random_init_and_encodes(tiny: Prior):
    assert isinstance(tiny, ModulePrior) and tiny.random_init
    assert tiny.output_dim == timm_model().num_features, "not timm's pooled features"
    assert tiny.preprocessing.image_size == (32, 32)
    out = tiny.encode_batch(random_pixels(tiny))
    assert out.dtype == torch.float32 and out.shape == (4, tiny.output_dim)
    assert torch.isfinite(out).all()


def test_same_seed_same_weights_other_seed_other_weights(tiny: Prior):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = load_prior(TINY)
    assert torch.equal(torch.rand(3), expected_draw), "loading must leave the caller's random state alone"
    assert again.fingerprint == tiny.fingerprint == fingerprint_weights(timm_model(seed=0))
    assert torch.equal(again.encode_batch(random_pixels(again)), tiny.encode_batch(random_pixels(tiny)))
    assert load_prior(PriorSpec("timm:resnet10t", seed=1, image_size=32)).fingerprint != tiny.fingerprint


def test_preprocessing_comes_from_timms_data_config(tiny: Prior):
    native = load_prior(PriorSpec("timm:resnet10t"))
    for prior, overrides in ((native, {}), (tiny, {"input_size": (3, 32, 32)})):
        config = resolve_data_config(overrides, model=timm_model())
        recorded = prior.preprocessing
        assert (3, *recorded.image_size) == config["input_size"], f"input size of {overrides}"
        assert (recorded.mean, recorded.std) == (config["mean"], config["std"]), f"mean/std of {overrides}"
        assert (recorded.interpolation, recorded.crop_pct) == (config["interpolation"], config["crop_pct"])
        assert recorded.resize_mode == "shortest" and config["crop_mode"] == "center"
        expected = create_transform(**config)(photo())
        assert torch.allclose(prior.preprocess(photo()), expected, atol=1e-6), f"not timm's transform at {overrides}"
    assert native.preprocessing.image_size == (176, 176) and native.preprocessing.crop_pct == 0.875
    gray = tiny.preprocess(photo().convert("L"))
    mean, std = torch.tensor(tiny.preprocessing.mean), torch.tensor(tiny.preprocessing.std)
    channels = gray * std[:, None, None] + mean[:, None, None]
    assert gray.shape == (3, 32, 32) and torch.allclose(channels[0], channels[2], atol=1e-5), "grayscale is not RGB"


@pytest.mark.parametrize("size, crop_pct, resize_mode", [
    ((32, 32), 1.0, "shortest"), ((32, 32), 0.875, "shortest"), ((24, 40), 0.9, "shortest"),
    ((24, 40), 1.0, "squash"), ((24, 40), 0.95, "squash"),
])
def test_preprocessing_transform_is_timms_eval_transform(size, crop_pct, resize_mode):
    record = Preprocessing(image_size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                           interpolation="bicubic", resize_mode=resize_mode, crop_pct=crop_pct)
    timm_mode = {"shortest": "center", "squash": "squash"}[resize_mode]
    expected = create_transform(input_size=(3, *size), interpolation="bicubic", mean=record.mean, std=record.std,
                                crop_pct=crop_pct, crop_mode=timm_mode)(photo())
    assert torch.allclose(record.transform()(photo()), expected, atol=1e-6)


def test_preprocessing_records_without_a_crop_fraction_stay_as_they_were():
    old = {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
           "resize_mode": "shortest", "fill_color": 0}
    record = Preprocessing.from_dict(old)
    assert record.crop_pct == 1.0 and "crop_pct" not in record.to_dict()
    cropped = Preprocessing.from_dict({**old, "crop_pct": 0.875})
    assert cropped.crop_pct == 0.875 and Preprocessing.from_dict(cropped.to_dict()) == cropped
    with pytest.raises(ConfigError, match="takes no crop fraction"):
        Preprocessing.from_dict({**old, "resize_mode": "longest", "crop_pct": 0.9})
    with pytest.raises(ConfigError, match=r"crop fraction must lie in \(0, 1\]"):
        Preprocessing.from_dict({**old, "crop_pct": 1.5})


def test_own_checkpoint_gives_the_same_prior(tiny: Prior, tmp_path: Path):
    path = tmp_path / "resnet10t.safetensors"
    save_file(timm_model(seed=0).state_dict(), str(path))
    loaded = load_prior(PriorSpec("timm:resnet10t", checkpoint=str(path), seed=5, image_size=32))
    assert not loaded.random_init
    assert loaded.fingerprint == tiny.fingerprint, "the checkpoint's weights were not all loaded"
    assert torch.equal(loaded.encode_batch(random_pixels(loaded)), tiny.encode_batch(random_pixels(tiny)))


def test_a_classifier_checkpoint_loads_without_its_classifier(tmp_path: Path):
    classifier = timm_model(num_classes=1000, seed=7)
    path = tmp_path / "resnet10t-in1k.safetensors"
    save_file(classifier.state_dict(), str(path))
    loaded = load_prior(PriorSpec("timm:resnet10t", checkpoint=str(path), image_size=32))
    classifier.reset_classifier(0)
    assert loaded.fingerprint == fingerprint_weights(classifier)


def test_checkpoint_of_another_model_is_refused(tmp_path: Path):
    path = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(4, 4)}, str(path))
    with pytest.raises(PriorError, match="does not fit timm:resnet10t") as info:
        load_prior(PriorSpec("timm:resnet10t", checkpoint=str(path), image_size=32))
    assert "state dict of timm's resnet10t" in info.value.hint
    with pytest.raises(PriorError, match="does not exist"):
        load_prior(PriorSpec("timm:resnet10t", checkpoint=str(tmp_path / "nope.safetensors")))


def test_a_vit_takes_the_image_size_as_its_input_size():
    vit = load_prior(PriorSpec("timm:vit_tiny_patch16_224", image_size=32))
    assert vit.preprocessing.image_size == (32, 32) and vit.preprocessing.crop_pct == 0.9
    assert vit.encode_batch(random_pixels(vit, 2)).shape == (2, 192)


def test_bf16_on_cpu_is_close_to_fp32(tiny: Prior):
    fast = load_prior(TINY, precision="bf16")
    assert fast.fingerprint == tiny.fingerprint and fast.precision == "bf16"
    pixels = random_pixels(tiny)
    out = fast.encode_batch(pixels)
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, tiny.encode_batch(pixels)).min() > 0.98


@pytest.mark.parametrize("spec, error, message, hint", [
    (PriorSpec("timm:resnt10t"), PriorError, r"Unknown timm model 'resnt10t'\. Did you mean resnet10t", "timm"),
    (PriorSpec("timm:resnet10t.nope"), PriorError, r"no pretrained tag 'nope'; known tags: c3_in1k", "--checkpoint"),
    (PriorSpec("timm:resnet10t", pretrained="nope"), PriorError, r"no pretrained tag 'nope'", "--checkpoint"),
    (PriorSpec("timm:resnet10t", pretrained="true"), PriorError,
     r"c3_in1k weights of timm's resnet10t could not be downloaded", "hf download timm/resnet10t.c3_in1k"),
    (PriorSpec("timm:resnet10t", pretrained="c3_in1k"), PriorError, r"could not be downloaded",
     "--model timm:resnet10t.c3_in1k --checkpoint PATH"),
    (PriorSpec("timm:resnet10t.c3_in1k", pretrained="other"), ConfigError,
     r"names the pretrained tag 'c3_in1k' and --pretrained another", "--pretrained true"),
    (PriorSpec("timm:hf-hub:org/net", checkpoint="x.pt"), ConfigError, "brings its own weights",
     "name a timm architecture"),
    (PriorSpec("timm:hf-hub:nobody/nothing"), PriorError, r"Could not load timm:hf-hub:nobody/nothing", "coopt-hub hub import-model nobody/nothing"),
    (PriorSpec("timm:vit_tiny_patch16_224", image_size=8), PriorError, r"does not run on 8x8 images", "--image-size"),
])
def test_timm_errors_say_what_to_do(spec, error, message, hint):
    with pytest.raises(error, match=message) as info:
        load_prior(spec)
    assert hint in info.value.hint


def test_fp16_needs_cuda():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        load_prior(TINY, precision="fp16")


# End to end on the embedded hub ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collab(small_source, new_collaboration):
    """A collaboration nobody pushes to: 240 digits, 2 shards, 32 anchors, 16 dimensions."""
    return new_collaboration(small_source, "timm-coopt", shards=2, anchors=32, dim=16)


def targets_bytes(result_dir: Path, shard: int) -> bytes:
    return (result_dir / shard_prefix(shard) / TARGETS_FILE).read_bytes()


def test_the_cli_picks_up_an_entry_point_backend(plugin, collab, tmp_path):
    directory, _ = plugin
    path = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    coopt_hub = Path(sys.executable).parent / "coopt-hub"
    done = subprocess.run([str(coopt_hub), "optimize", collab.repo, "--shard", "0", "--model", "mine:3",
                           "--workdir", str(tmp_path), "--json"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)["report"]
    assert report["prior"]["model"] == "mine:3", "the job did not record the third-party prior"
    assert report["output_dim"] == 27, "the job did not run the third-party prior"
    assert report["counts"]["rows"] == len(collab.plan.shard_ids(0))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_accelerate_processes_give_the_same_timm_targets_as_one(hub, collab, tiny, tmp_path):
    # At the command line's default precision, with the channels-last layout of a convolutional prior.
    fast = load_job_prior(TINY, "cpu", "auto")
    assert fast.channels_last, "a convolutional prior runs channels-last"
    single = optimize_shard(hub, collab.repo, 1, fast, workdir=tmp_path / "single")
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "coopt_hub", "optimize", collab.repo, "--shard", "1", *TINY_ARGS,
               "--workdir", str(tmp_path / "double"), "--json"]
    # CPU kernels split their sums by thread count: the processes use as many threads as the
    # single-process run did, so that the comparison is exact.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["report"]["run"]["world_size"] == 2, "the job did not run as 2 processes"
    assert summary["report"]["fingerprint"] == tiny.fingerprint, "the processes loaded other weights"
    assert summary["report"]["precision"] == fast.precision, "the processes ran another precision"
    assert targets_bytes(Path(summary["directory"]), 1) == targets_bytes(single.directory, 1), "other targets"
