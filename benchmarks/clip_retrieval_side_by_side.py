"""`coopt-hub optimize --push` against clip-retrieval's inference: same images, weights and batch size.

    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install clip-retrieval "setuptools<81"  # once, apart
    python benchmarks/clip_retrieval_side_by_side.py /tmp/peer [--images 2000] [--image-size 224]
                                                    [--batch-size 64] [--repeats 2]

VENV (the first argument) is a virtual environment holding clip-retrieval, which is never a
dependency of coopt-hub. Both sides embed the same `--images` PNGs: scikit-learn's digits upscaled
to `--image-size` px (1,797 of them, repeated from the first to reach the count), with the same
random-init ViT-S-32 saved to a local checkpoint that both load (`--checkpoint` for coopt-hub,
`open_clip:ViT-S-32/<path>` for clip-retrieval), at the same batch size, offline:
- clip-retrieval: `clip-retrieval inference` on a folder of the PNG files (its `files` input), its
  other settings at their defaults, into a fresh output folder each time;
- coopt-hub: the PNGs as the parquet source of an embedded hub, a one-shard collaboration on it (a
  new one each time), and `coopt-hub optimize --push` with its other settings at their defaults; it
  also encodes the plan's anchors and aligns and pushes its result.
Each is timed end to end as its own process, start-up included, alternately `--repeats` times; on a
machine shared with other jobs the best time of each is the one least slowed by them. One batch of
clip-retrieval's embeddings is checked against coopt-hub's prior on the same images, to show that
both ran the same model on the same pixels.

The last line is `coopt-hub end-to-end speedup over clip-retrieval: <x>` (clip-retrieval's best time
over coopt-hub's; goal >= 1.5 on CPU).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from labeling import describe_optimize, embedded_hub, publish_source, run_optimize, start_collaboration

MODEL = "ViT-S-32"


def digit_pngs(count: int, size: int) -> list[bytes]:
    from coopt_hub.demo.sample_data import digits_images

    images, _ = digits_images(size)
    pngs = []
    for image in images[:count]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return [pngs[i % len(pngs)] for i in range(count)]


def save_random_checkpoint(path: Path, seed: int = 0) -> None:
    """A random-init ViT-S-32 (the whole CLIP model: clip-retrieval loads it whole) as a plain state dict."""
    import open_clip

    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip would announce the random init asked for as a warning
    try:
        torch.save(open_clip.create_model(MODEL, pretrained=None).state_dict(), path)
    finally:
        logging.disable(logging.NOTSET)


def peer_versions(venv: Path) -> str:
    script = ("import importlib.metadata as m; "
              "print(', '.join(f'{d} {m.version(d)}' for d in ('clip-retrieval', 'open_clip_torch', 'torch')))")
    return subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True,
                          check=True).stdout.strip()


def run_clip_retrieval(venv: Path, images: Path, output: Path, checkpoint: Path, batch_size: int) -> float:
    """Wall seconds of `clip-retrieval inference` over the image files in `images`, offline."""
    command = [str(venv / "bin" / "clip-retrieval"), "inference", "--input_dataset", str(images),
               "--output_folder", str(output), "--input_format", "files", "--batch_size", str(batch_size),
               # all_clip splits `open_clip:NAME/CHECKPOINT` at the first slash: an absolute path keeps its own.
               "--clip_model", f"open_clip:{MODEL}/{checkpoint.resolve()}", "--enable_text", "False"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def same_model_cosine(output: Path, images: Path, checkpoint: Path, rows: int = 32) -> float:
    """The lowest cosine between clip-retrieval's embeddings of its first `rows` images and coopt-hub's
    prior's on the same files: ~1 when both ran the same weights on the same pixels."""
    import pandas as pd
    from PIL import Image

    from coopt_hub.priors import PriorSpec, load_prior

    theirs = np.load(sorted((output / "img_emb").glob("*.npy"))[0])[:rows].astype(np.float32)
    names = pd.read_parquet(sorted((output / "metadata").glob("*.parquet"))[0])["image_path"][:rows]
    prior = load_prior(PriorSpec(model=MODEL, checkpoint=str(checkpoint)))
    pixels = torch.stack([prior.preprocess(Image.open(images / Path(name).name).convert("RGB")) for name in names])
    ours = prior.encode_batch(pixels).numpy()
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    return float((ours * theirs).sum(axis=1).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("venv", type=Path, help="a virtual environment with clip-retrieval installed")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=224, help="side of the upscaled digits, in px")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not (args.venv / "bin" / "clip-retrieval").is_file():
        raise SystemExit(f"{args.venv}/bin/clip-retrieval not found: install it there with "
                         f"`python3 -m venv {args.venv} && {args.venv}/bin/pip install clip-retrieval 'setuptools<81'` "
                         "(its clip package still imports pkg_resources).")

    with tempfile.TemporaryDirectory(prefix="coopt-vs-clip-retrieval-") as scratch, embedded_hub(Path(scratch)):
        root = Path(scratch)
        pngs = digit_pngs(args.images, args.image_size)  # inside: the digits' module imports huggingface_hub
        files = root / "files"
        files.mkdir()
        for i, png in enumerate(pngs):
            (files / f"{i:05d}.png").write_bytes(png)
        checkpoint = root / "vit-s-32.pt"
        save_random_checkpoint(checkpoint)
        # Row groups of a few batches, as a source's storage units are.
        publish_source("bench/digits", pngs, rows_per_group=4 * args.batch_size)
        print(f"{args.images} digit PNGs of {args.image_size} px (~{sum(map(len, pngs)) / len(pngs) / 1024:.1f} KB), "
              f"random-init {MODEL} from {checkpoint.name}, batch {args.batch_size}, "
              f"{torch.get_num_threads()} torch threads; from {args.venv}: {peer_versions(args.venv)}")

        theirs, ours = [], []
        for repeat in range(args.repeats):
            output = root / f"clip-retrieval-{repeat}"
            theirs.append(run_clip_retrieval(args.venv, files, output, checkpoint, args.batch_size))
            repo = f"bench/digits-coopt-{repeat}"
            start_collaboration(repo, "bench/digits")
            run = run_optimize(repo, MODEL, root / f"work-{repeat}", "--checkpoint", str(checkpoint),
                               "--batch-size", str(args.batch_size), "--push")
            ours.append(run.seconds)
            print(f"repeat {repeat}: clip-retrieval {theirs[-1]:.1f}s for {args.images} images; "
                  f"coopt-hub optimize --push {describe_optimize(run)}")
        print(f"same model on the same pixels: lowest cosine {same_model_cosine(output, files, checkpoint):.4f}")
    print(f"clip-retrieval: best {min(theirs):.1f}s ({args.images / min(theirs):.1f} img/s); "
          f"coopt-hub optimize --push: best {min(ours):.1f}s ({args.images / min(ours):.1f} img/s of the source)")
    print(f"coopt-hub end-to-end speedup over clip-retrieval: {min(theirs) / min(ours):.2f}")


if __name__ == "__main__":
    main()
