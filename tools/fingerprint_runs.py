"""Train a fixed set of small runs on both backends and print a fingerprint of their numbers, so that
a restructuring can show it changed none of them:

    python tools/fingerprint_runs.py > before.json
    ... change the code ...
    python tools/fingerprint_runs.py > after.json && diff before.json after.json && echo same numbers

Each run's fingerprint is the SHA-256 of its final parameters and optimizer state (checkpoint.npz)
and of its per-epoch metrics without the timings. The runs cover every activation and optimizer,
layer norm, dropout, label smoothing, clipping, every augmentation, --pca and bf16, on synthetic
images built from a fixed seed (bf16 with FASTNET_BF16_ANY_CPU=1, for any CPU).
"""

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["FASTNET_BF16_ANY_CPU"] = "1"

from fastnet.config import TrainConfig
from fastnet.run_folder import TIMING_METRICS
from fastnet.train import train  # after the path is set

RUNS = {
    "relu-nesterov": {},
    "gelu-layernorm-adamw": dict(activation="gelu", norm="layernorm", dropout=0.1, optimizer="adamw", lr=0.003,
                                 label_smoothing=0.1),
    "leaky_relu-sgd-augmented": dict(activation="leaky_relu", optimizer="sgd", flip=True, translate=1),
    "tanh-momentum-cutout-clip": dict(activation="tanh", optimizer="momentum", cutout=2, clip=1.0),
    "relu-adam-pca-flip": dict(optimizer="adam", lr=0.002, pca=20, flip=True),
    "gelu-dropout-bf16": dict(activation="gelu", precision="bf16", dropout=0.2),
    "tanh-layernorm-bf16": dict(activation="tanh", norm="layernorm", precision="bf16"),
}
BACKENDS = ("numpy", "numba")


def synthetic_images(folder):
    """3,000 training and 500 test images of 8 x 8 x 3 in five classes of brightness."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3000), ("test", 500)):
        labels = rng.integers(0, 5, count)
        noise = rng.normal(0, 50, (count, 8, 8, 3))
        images = np.clip(labels[:, None, None, None] * 40 + 30 + noise, 0, 255).astype(np.uint8)
        np.save(folder / f"{split}_images.npy", images)
        np.save(folder / f"{split}_labels.npy", labels)


def fingerprint(run):
    digest = hashlib.sha256()
    with np.load(run / "checkpoint.npz", allow_pickle=False) as arrays:
        for name in sorted(n for n in arrays.files if n.startswith(("param_", "optim_"))):
            digest.update(name.encode() + str(arrays[name].dtype).encode() + arrays[name].tobytes())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        metrics = {k: v for k, v in json.loads(line).items() if k not in TIMING_METRICS}
        digest.update(json.dumps(metrics, sort_keys=True).encode())
    return digest.hexdigest()


def main():
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        synthetic_images(scratch)
        prints = {}
        for backend in BACKENDS:
            for name, settings in RUNS.items():
                run = scratch / f"{backend}-{name}"
                train(TrainConfig(data=str(scratch), backend=backend, hidden=(32, 16), epochs=2, batch_size=50,
                                  val=300, out=str(run), **settings), log=lambda line: None)
                prints[f"{backend} {name}"] = fingerprint(run)
    print(json.dumps(prints, indent=1))


if __name__ == "__main__":
    main()
