"""The bundled real-data sample: 500 rotated MNIST digits shipped inside the package.

Notebooks, the equivariance instrument and tests use it as a natural input without touching the
network or the raw data folder. The file ``kit/assets/mnist_rot_sample.npz`` is built from the raw
MNIST *test* split by :func:`kit.data.rotated_mnist` with seed 2007 (bilinear interpolation) and
stored as uint8; ``kit/assets/SAMPLE.md`` records its provenance and licence. Rebuild it with::

    python -m kit.data.sample            # [--out PATH] [--root RAW_MNIST_FOLDER]

The build is deterministic: rebuilding reproduces the stored arrays exactly.
"""
from __future__ import annotations

import argparse
import functools
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .._io import KIT_DIR, atomic_write

__all__ = ["SAMPLE_FILE", "SAMPLE_SIZE", "SAMPLE_SEED", "SAMPLE_SPLIT", "SAMPLE_MODE",
           "sample_path", "load_sample", "digit", "build_sample"]

SAMPLE_FILE = "mnist_rot_sample.npz"
SAMPLE_SIZE = 500
SAMPLE_SEED = 2007
SAMPLE_SPLIT = "test"
SAMPLE_MODE = "bilinear"

_DEFAULT_OUT = KIT_DIR / "assets" / SAMPLE_FILE


def sample_path() -> Path:
    """Filesystem path of the bundled sample (inside the installed package)."""
    with resources.as_file(resources.files("kit") / "assets" / SAMPLE_FILE) as p:
        path = Path(p)
    if not path.is_file():
        raise FileNotFoundError(f"bundled sample {path} is missing; rebuild it with "
                                f"`python -m kit.data.sample` (needs the raw MNIST files, see kit.data)")
    return path


@functools.lru_cache(maxsize=1)
def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_sample() -> dict:
    """The bundled sample as torch tensors (fresh copies on every call).

    Keys: ``images`` float32 ``(500, 1, 28, 28)`` in [0, 1]; ``labels`` long ``(500,)`` in 0..9;
    ``angles`` float32 ``(500,)``: the counter-clockwise rotation of each digit, degrees in
    [0, 360); ``source_index`` long ``(500,)``: the digit's index in the raw MNIST test split.
    """
    a = _load_arrays(sample_path())
    return {
        "images": torch.from_numpy(a["images"].astype(np.float32) / np.float32(255.0))[:, None],
        "labels": torch.from_numpy(a["labels"].astype(np.int64)),
        "angles": torch.from_numpy(a["angles"].astype(np.float32)),
        "source_index": torch.from_numpy(a["source_index"].astype(np.int64)),
    }


def digit(i: int = 0) -> torch.Tensor:
    """Digit ``i`` of the bundled sample as a ``(1, 1, 28, 28)`` float32 tensor in [0, 1]."""
    images = _load_arrays(sample_path())["images"]
    n = len(images)
    if not -n <= i < n:
        raise IndexError(f"sample digit index {i} out of range: the sample has {n} digits")
    return torch.from_numpy(images[i].astype(np.float32) / np.float32(255.0))[None, None]


def _sample_arrays(root=None) -> dict[str, np.ndarray]:
    """The arrays of the sample, computed from the raw MNIST files (what the npz stores)."""
    from kit.data import rotated_mnist

    d = rotated_mnist(SAMPLE_SIZE, seed=SAMPLE_SEED, split=SAMPLE_SPLIT, root=root, mode=SAMPLE_MODE)
    images = np.round(255.0 * d["images"].numpy().astype(np.float64)).clip(0, 255).astype(np.uint8)
    return {
        "images": images,
        "labels": d["labels"].astype(np.uint8),
        "angles": d["angles_deg"].astype(np.float32),
        "source_index": d["source_index"].astype(np.int32),
    }


def build_sample(out: str | os.PathLike | None = None, root: str | os.PathLike | None = None) -> Path:
    """Build the sample from the raw MNIST files and write it atomically; return the path.

    ``out`` defaults to the bundled ``kit/assets/mnist_rot_sample.npz``; ``root`` is the raw
    MNIST folder (see :func:`kit.data.mnist_root`). The file is written to a temporary file in
    the same folder and moved into place with ``os.replace``.
    """
    out = Path(out) if out is not None else _DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = _sample_arrays(root)
    atomic_write(out, lambda fh: np.savez_compressed(fh, **arrays))
    _load_arrays.cache_clear()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kit.data.sample",
                                 description="Rebuild the bundled rotated-MNIST sample from raw MNIST.")
    ap.add_argument("--out", default=None, help=f"output .npz (default: {_DEFAULT_OUT})")
    ap.add_argument("--root", default=None,
                    help="folder with the raw MNIST gzip files (default: $KIT_DATA or ../shared/data/mnist)")
    args = ap.parse_args(argv)
    path = build_sample(out=args.out, root=args.root)
    print(f"wrote {path} ({path.stat().st_size} bytes, {SAMPLE_SIZE} digits, seed {SAMPLE_SEED})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
