"""Datasets of eqkit: every loader the notebooks, tests and benchmarks use lives here.

Sections
--------
1. **Locating data** -- :func:`mnist_root` (explicit folder, ``$KIT_DATA``, ``../shared/data/mnist``).
2. **Checksums and the IDX format** -- :func:`md5sum`, :func:`verify_file`, :func:`read_idx`.
3. **Raw MNIST** -- :func:`load_mnist_raw`: the four original files, md5-verified, cached in-process.
4. **Rotated MNIST, rebuilt** -- :func:`rotate_digits` and :func:`rotated_mnist`: the MNIST-rot
   protocol (each digit rotated about the image centre by its own angle drawn uniformly in
   [0, 360) degrees) applied to raw MNIST offline. Data built this way is *rebuilt* MNIST-rot, not
   the official archive of Larochelle et al. (2007); label it so wherever its numbers are shown.

Further sections (the official MNIST-rot archive, CIFAR-10/100, synthetic test data) belong below.
Rotation conventions (counter-clockwise positive, about the image centre, row 0 at the top) come
from :mod:`kit.groups`; nothing here re-decides them. Nothing in this module touches the network.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MNIST_FILES", "MNIST_SPLITS", "mnist_root", "md5sum", "verify_file", "read_idx",
    "load_mnist_raw", "rotate_digits", "rotated_mnist",
]

# =============================================================================================
# 1. Locating data
# =============================================================================================

#: The four original MNIST files: name -> (filename, md5 of the gzip file as distributed).
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}

#: Valid values of ``split`` and their sizes.
MNIST_SPLITS: dict[str, int] = {"train": 60000, "test": 10000}

#: The repository root (``kit/..``); the offline data folder is ``<repo>/../shared/data/mnist``.
_REPO_ROOT = Path(__file__).resolve().parent.parent
_SHARED_REL = Path("..") / "shared" / "data" / "mnist"


def _has_mnist_files(folder: Path) -> bool:
    return all((folder / fname).is_file() for fname, _ in MNIST_FILES.values())


def _with_subfolder(folder: Path) -> list[Path]:
    """A data folder may hold the files itself or in a ``mnist/`` subfolder."""
    return [folder, folder / "mnist"]


def mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the four raw MNIST files (see :data:`MNIST_FILES`).

    Resolution order:

    1. ``root`` if given (the folder itself or its ``mnist/`` subfolder); no fallback if it lacks
       the files -- an explicit folder that is wrong is an error;
    2. the environment variable ``KIT_DATA`` (the folder itself or its ``mnist/`` subfolder);
    3. ``../shared/data/mnist`` relative to the repository root (``kit/..``);
    4. ``../shared/data/mnist`` relative to the current working directory.

    Raises ``FileNotFoundError`` naming the expected files and every folder searched.
    """
    if root is not None:
        candidates = _with_subfolder(Path(root).expanduser())
    else:
        candidates = []
        env = os.environ.get("KIT_DATA")
        if env:
            candidates += _with_subfolder(Path(env).expanduser())
        candidates += [_REPO_ROOT / _SHARED_REL, Path.cwd() / _SHARED_REL]
    seen: list[Path] = []
    for c in candidates:
        c = c.resolve()
        if c in seen:
            continue
        seen.append(c)
        if _has_mnist_files(c):
            return c
    files = ", ".join(fname for fname, _ in MNIST_FILES.values())
    where = "\n  ".join(str(s) for s in seen)
    how = ("the folder given as root" if root is not None
           else f"KIT_DATA={os.environ['KIT_DATA']!r}" if os.environ.get("KIT_DATA") else "KIT_DATA unset")
    raise FileNotFoundError(
        f"raw MNIST not found ({how}). Expected the files {files} in one of:\n  {where}\n"
        f"Set the environment variable KIT_DATA to the folder holding them (or to a folder with a "
        f"'mnist/' subfolder holding them), or pass root=...")


# =============================================================================================
# 2. Checksums and the IDX format
# =============================================================================================

def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: str | os.PathLike, md5: str) -> Path:
    """Check a file's MD5; return its path, or raise ``ValueError`` naming expected and actual."""
    path = Path(path)
    actual = md5sum(path)
    if actual.lower() != md5.lower():
        raise ValueError(f"checksum mismatch for {path}: expected md5 {md5.lower()}, actual md5 "
                         f"{actual} (the file is corrupt, truncated or a different file)")
    return path


# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain; detected from the content) into a numpy array.

    The header is the magic number ``0x00 0x00 <type code> <ndim>`` followed by ``ndim``
    big-endian uint32 sizes; the body must hold exactly ``prod(sizes)`` items of the type.
    Returns a writable array in native byte order. Raises ``ValueError`` on a malformed file
    (bad magic, unknown type code, truncated header or body, trailing bytes, corrupt gzip).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # BadGzipFile is an OSError; truncated gzip -> EOFError
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes, the magic number needs 4)")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (magic number starts with {zero.hex()}, expected 0000)")
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim < 1:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions (expected >= 1)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    count = math.prod(shape)
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "trailing bytes in"
        raise ValueError(f"{path}: {kind} IDX file: shape {shape} of {dtype.name} needs {expected} bytes, "
                         f"file has {len(raw)}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


# =============================================================================================
# 3. Raw MNIST
# =============================================================================================

@functools.lru_cache(maxsize=4)
def _load_mnist_files(images_path: Path, labels_path: Path, images_md5: str, labels_md5: str,
                      verify: bool) -> tuple[np.ndarray, np.ndarray]:
    if verify:
        verify_file(images_path, images_md5)
        verify_file(labels_path, labels_md5)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images (N, 28, 28), "
                         f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} labels, got shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{labels_path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    images.setflags(write=False)   # shared by every caller through the cache
    labels.setflags(write=False)
    return images, labels


def load_mnist_raw(split: str = "train", root: str | os.PathLike | None = None,
                   verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The raw MNIST ``split`` ('train': 60000 digits, 'test': 10000).

    Returns ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``. With ``verify`` the
    gzip files are checked against :data:`MNIST_FILES` first. Decoded arrays are cached in-process
    (keyed on the resolved file paths) and are **read-only**; copy them before modifying.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; valid splits: {', '.join(map(repr, MNIST_SPLITS))}")
    folder = mnist_root(root)
    (img_name, img_md5), (lab_name, lab_md5) = MNIST_FILES[f"{split}_images"], MNIST_FILES[f"{split}_labels"]
    return _load_mnist_files(folder / img_name, folder / lab_name, img_md5, lab_md5, bool(verify))


# =============================================================================================
# 4. Rotated MNIST, rebuilt with the MNIST-rot protocol
# =============================================================================================

_ROTATE_CHUNK = 8192  # images per grid_sample call: bounds memory on the full 62k set


def rotate_digits(images, angles_deg, mode: str = "bilinear") -> torch.Tensor:
    """Rotate each image counter-clockwise about its centre by its own angle (MNIST-rot protocol).

    ``images``: ``(N, H, W)`` array or tensor; uint8 is scaled to [0, 1] by ``/255``, floating
    input is taken as already in [0, 1]. ``angles_deg``: ``(N,)`` (or a scalar for all), degrees.
    ``mode``: 'bilinear' (default), 'bicubic' or 'nearest'; zeros outside the image.

    Returns a float32 tensor ``(N, H, W)`` clamped to [0, 1] (bicubic can overshoot). The same
    convention and sampling grid as :func:`kit.groups.rotate_image`, but vectorised: per-image
    grids are built at once (``affine_grid`` in float64, like ``rotate_image``'s grid) and
    resampled in float32 by one ``grid_sample`` call per chunk of 8192 images. Angles that are
    exact multiples of 90 degrees use ``torch.rot90`` as ``rotate_image`` does.
    """
    if not isinstance(images, torch.Tensor):
        images = np.require(images, requirements="W")  # the raw-MNIST cache is read-only: copy
    x = torch.as_tensor(images).cpu()
    if x.dim() != 3:
        raise ValueError(f"expected images (N, H, W), got shape {tuple(x.shape)}")
    N, H, W = x.shape
    x = x.to(torch.float32) / 255.0 if not x.is_floating_point() else x.to(torch.float32)
    ang = torch.as_tensor(np.asarray(angles_deg, dtype=np.float64)).reshape(-1)
    if ang.numel() == 1 and N != 1:
        ang = ang.expand(N)
    if ang.numel() != N:
        raise ValueError(f"got {ang.numel()} angles for {N} images")
    if mode not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"unknown interpolation mode {mode!r}; use 'bilinear', 'bicubic' or 'nearest'")
    out = torch.empty(N, H, W, dtype=torch.float32)
    if N == 0:
        return out
    # Output pixel p samples the input at R^-1 p (planar coordinates: x right, y up, origin at the
    # image centre), written in grid_sample's normalised coordinates (u right, v down, in [-1, 1]
    # across pixel centres): u' = c u - s (H-1)/(W-1) v,  v' = s (W-1)/(H-1) u + c v.
    ax, ay = (H - 1) / (W - 1) if W > 1 else 0.0, (W - 1) / (H - 1) if H > 1 else 0.0
    for start in range(0, N, _ROTATE_CHUNK):
        sl = slice(start, min(start + _ROTATE_CHUNK, N))
        t = torch.deg2rad(ang[sl])
        c, s, z = torch.cos(t), torch.sin(t), torch.zeros_like(t)
        theta = torch.stack([torch.stack([c, -s * ax, z], -1), torch.stack([s * ay, c, z], -1)], 1)
        grid = F.affine_grid(theta, [len(t), 1, H, W], align_corners=True).float()  # float64 -> float32
        out[sl] = F.grid_sample(x[sl, None], grid, mode=mode, padding_mode="zeros",
                                align_corners=True)[:, 0]
    # Exact quarter turns: no interpolation at all, identical to kit.groups.rotate_image.
    q = ang / 90.0
    exact = (q - q.round()).abs() < 1e-9                          # same rule as kit.groups
    turns = q.round().remainder(4).long()
    for k in (0, 1, 2, 3):
        sel = exact & (turns == k)
        if sel.any():
            out[sel] = torch.rot90(x[sel], k, dims=(-2, -1)) if k else x[sel]
    return out.clamp_(0.0, 1.0)


def rotated_mnist(n: int, seed: int, split: str = "train", root: str | os.PathLike | None = None,
                  mode: str = "bilinear") -> dict:
    """``n`` raw-MNIST digits, each rotated by its own angle drawn uniformly in [0, 360) degrees.

    Draws with ``numpy.random.default_rng(seed)``: first the ``n`` source indices without
    replacement (``rng.choice``), then the ``n`` angles (``rng.uniform(0, 360)``), rounded to
    float32 (the stored precision) and wrapped into [0, 360) so the stored angle is exactly the
    one applied. Returns a dict: ``images`` float32 tensor ``(n, 28, 28)`` in [0, 1], ``labels``
    int64 ``(n,)``, ``angles_deg`` float32 ``(n,)``, ``source_index`` int64 ``(n,)`` (numpy).
    This is *rebuilt* MNIST-rot; say so wherever results on it are shown.
    """
    images, labels = load_mnist_raw(split, root=root)
    n = int(n)
    if not 0 <= n <= len(images):
        raise ValueError(f"n must be in 0..{len(images)} for the {split!r} split, got {n}")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), size=n, replace=False).astype(np.int64)
    angles = rng.uniform(0.0, 360.0, size=n).astype(np.float32)
    angles = np.where(angles >= np.float32(360.0), np.float32(0.0), angles).astype(np.float32)
    return {
        "images": rotate_digits(images[idx], angles.astype(np.float64), mode=mode),
        "labels": labels[idx].astype(np.int64),
        "angles_deg": angles,
        "source_index": idx,
    }
