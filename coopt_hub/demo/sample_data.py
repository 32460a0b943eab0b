"""A real labeled image dataset that ships inside an installed package: scikit-learn's digits.

Used by `coopt-hub demo` and the tests as the source dataset, published to a Hub as parquet with
embedded RGB PNGs, a `train` and a `test` split, like any image dataset on the Hub.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from coopt_hub.hub.client import Hub

# datasets writes image datasets in row groups of this many rows: a 1,437-row train split then has
# 15 storage units, enough to give every shard its own row groups.
ROWS_PER_GROUP = 100


def digits_images(image_size: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    """All 1,797 digits as RGB images of `image_size` px (upscaled from 8x8), and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # The 8x8 images hold values 0..16 (ink); invert to dark ink on white paper like a scan.
    pixels = (255 - digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    images = [
        Image.fromarray(image, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR).convert("RGB")
        for image in pixels
    ]
    return images, digits.target.astype(np.int64)


def digits_dataset(image_size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """A `datasets.DatasetDict` with `train` and `test` splits (columns `image`, `label`)."""
    import datasets

    images, labels = digits_images(image_size)
    order = np.random.default_rng(seed).permutation(len(images))
    test_size = int(round(len(images) * test_fraction))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def split(indices: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in indices], "label": [int(labels[i]) for i in indices]}, features=features
        )

    return datasets.DatasetDict({"train": split(order[test_size:]), "test": split(order[:test_size])})


CARD = """---
license: cc-by-4.0
pretty_name: scikit-learn digits (RGB PNG)
task_categories:
- image-classification
---
# digits

The 1,797 8x8 handwritten digits that ship with scikit-learn (UCI "Optical Recognition of
Handwritten Digits"), upscaled to {size}x{size} RGB PNGs, split {train}/{test} into train/test.
"""


def publish_digits(repo: str, image_size: int = 32, token: str | None = None, private: bool = False) -> str:
    """Publish the digits to `repo` as parquet in row groups of ROWS_PER_GROUP rows, in one commit.

    `push_to_hub` would write one 100 MB row group, which cannot be split between participants.
    Returns the commit sha.
    """
    from huggingface_hub import CommitOperationAdd

    dataset = digits_dataset(image_size)
    files = {}
    for split, rows in dataset.items():
        buffer = io.BytesIO()
        rows.to_parquet(buffer, batch_size=ROWS_PER_GROUP)
        files[f"data/{split}-00000-of-00001.parquet"] = buffer.getvalue()
    files["README.md"] = CARD.format(size=image_size, train=len(dataset["train"]), test=len(dataset["test"])).encode()
    hub = Hub(token=token)
    hub.ensure_repo(repo, private=private)
    return hub.commit(
        repo, "main", lambda head: [CommitOperationAdd(path, data) for path, data in files.items()],
        message="Publish scikit-learn digits as RGB PNGs",
    )
