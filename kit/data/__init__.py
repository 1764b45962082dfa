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

5. **Downloads** -- :func:`sha1sum`, :func:`download`: atomic (temporary file in the target folder,
   then ``os.replace``), checksum-verified; a corrupt or truncated file is deleted, never kept.
6. **MNIST-rot, official** -- :func:`load_mnist_rot`: the archive of Larochelle et al. (2007), SHA1
   verified, its ``.amat`` text parsed once into a cached ``.npz``.
7. **MNIST-rot, rebuilt** -- :func:`mnist_rot_rebuilt`: 62,000 digits drawn from raw MNIST with a
   fixed seed, 12k (10k train + 2k validation) / 50k test, the same protocol, offline.
8. **CIFAR-10 / CIFAR-100** -- :func:`load_cifar` through torchvision, with a stratified
   ``fraction`` (the E4 paper's "1/5 of CIFAR-10").
9. **Synthetic data for tests** -- :func:`synthetic`.
10. **One entry point** -- :func:`load_dataset` (names in :data:`DATASETS`) returning a
    :class:`DataBundle` of in-memory :class:`TensorData` splits and an ``info`` dict whose
    ``label`` says "rebuilt" for rebuilt data.

Rotation conventions (counter-clockwise positive, about the image centre, row 0 at the top) come
from :mod:`kit.groups`; nothing here re-decides them. Only :func:`download` touches the network, and
only when a file is missing and downloading is allowed (``download=True``; ``KIT_OFFLINE=1`` forbids it).
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import REPO_DIR, atomic_write, file_digest
from ..groups import rotate_batch

__all__ = [
    "MNIST_FILES", "MNIST_SPLITS", "mnist_root", "md5sum", "verify_file", "read_idx",
    "load_mnist_raw", "rotate_digits", "rotated_mnist",
    "DataNotFoundError", "data_dirs", "cache_dir", "sha1sum", "download",
    "MNIST_ROT_URL", "MNIST_ROT_SHA1", "MNIST_ROT_FILE", "parse_amat", "mnist_rot_archive", "load_mnist_rot",
    "REBUILT_SEED", "mnist_rot_rebuilt", "CIFAR_NORMALISATION", "load_cifar", "stratified_indices",
    "synthetic", "TensorData", "DataBundle", "DATASETS", "load_dataset",
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
_REPO_ROOT = REPO_DIR
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
    3. ``<repo>/data/mnist``, where :func:`fetch_mnist` (``python -m kit data fetch mnist``) puts them;
    4. ``../shared/data/mnist`` relative to the repository root (``kit/..``);
    5. ``../shared/data/mnist`` relative to the current working directory.

    Raises ``FileNotFoundError`` naming the expected files and every folder searched.
    """
    if root is not None:
        candidates = _with_subfolder(Path(root).expanduser())
    else:
        candidates = []
        env = os.environ.get("KIT_DATA")
        if env:
            candidates += _with_subfolder(Path(env).expanduser())
        candidates += [_REPO_ROOT / "data" / "mnist", _REPO_ROOT / _SHARED_REL, Path.cwd() / _SHARED_REL]
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
        f"'mnist/' subfolder holding them), or pass root=...; online, `python -m kit data fetch mnist` downloads "
        f"them (md5-checked) into {_REPO_ROOT / 'data' / 'mnist'}. Without them, train on the bundled sample: "
        f"dataset 'mnist-rot-sample' (or 'auto', which picks it when raw MNIST is absent).")


# =============================================================================================
# 2. Checksums and the IDX format
# =============================================================================================

def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    return file_digest(path, "md5", chunk_size=chunk_size)


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
    try:
        folder = mnist_root(root)
    except FileNotFoundError as missing:              # first use: fetch it when online and allowed
        if root is not None or _offline():
            raise
        try:
            folder = fetch_mnist()
        except Exception as e:  # noqa: BLE001 -- offline, DNS, HTTP: say so beside where we looked
            raise FileNotFoundError(f"{missing}\nFetching it failed too ({type(e).__name__}: {e}); set KIT_OFFLINE=1 "
                                    f"to skip the attempt.") from None
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
    for start in range(0, N, _ROTATE_CHUNK):                     # kit.groups.rotate_batch, in chunks
        sl = slice(start, min(start + _ROTATE_CHUNK, N))
        out[sl] = rotate_batch(x[sl], ang[sl], mode=mode)
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


# =============================================================================================
# 5. Downloads: atomic and checksum-verified
# =============================================================================================

class DataNotFoundError(FileNotFoundError):
    """A dataset file is missing and could not be downloaded; the message names the file and the
    folder to put it in."""


def data_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for dataset files, in order: ``root`` if given (only it), else ``$KIT_DATA``,
    ``<repo>/data``, ``<repo>/../shared/data`` and ``./../shared/data``."""
    if root is not None:
        return [Path(root).expanduser()]
    out = []
    if os.environ.get("KIT_DATA"):
        out.append(Path(os.environ["KIT_DATA"]).expanduser())
    out += [_REPO_ROOT / "data", _REPO_ROOT / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"]
    seen, res = set(), []
    for d in out:
        r = d.resolve()
        if r not in seen:
            seen.add(r)
            res.append(r)
    return res


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Where downloads and parsed caches go: ``root``, else ``$KIT_DATA``, else ``<repo>/data``
    (the first of them that is writable; ``<repo>/.kit_cache`` as a last resort)."""
    cands = [Path(root).expanduser()] if root is not None else []
    if root is None and os.environ.get("KIT_DATA"):
        cands.append(Path(os.environ["KIT_DATA"]).expanduser())
    cands += [_REPO_ROOT / "data", _REPO_ROOT / ".kit_cache"]
    for c in cands:
        if _writable(c):
            return c.resolve()
    raise PermissionError(f"no writable data folder among {[str(c) for c in cands]}")


def sha1sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA1 digest of a file, read in chunks."""
    return file_digest(path, "sha1", chunk_size=chunk_size)


def _fetch(url: str, fh, timeout: float = 60.0) -> None:
    """Copy the resource at ``url`` (http(s) or file://) into the open binary file ``fh``."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        shutil.copyfileobj(resp, fh, length=1 << 20)


def download(url: str, dest: str | os.PathLike, sha1: str | None = None, *, md5: str | None = None,
             fetch=None) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its SHA1 (or MD5).

    The bytes go to a temporary file in ``dest``'s folder; only a file whose SHA1 matches is moved
    into place with ``os.replace``. On a mismatch (corrupt or truncated transfer) or any error the
    temporary file is deleted, nothing is left at ``dest``, and ``ValueError`` (checksum) or the
    original error is raised. ``fetch(url, fh)`` replaces the network call (tests).
    """
    kind, expected = ("sha1", sha1) if sha1 else ("md5", md5)
    if not expected:
        raise ValueError("download() needs a sha1 or md5 checksum")

    def verify(tmp: Path):
        actual = sha1sum(tmp) if kind == "sha1" else md5sum(tmp)
        if actual.lower() != expected.lower():
            raise ValueError(f"checksum mismatch for {Path(dest).name} downloaded from {url}: expected {kind} "
                             f"{expected.lower()}, got {actual} ({os.path.getsize(tmp)} bytes; corrupt or "
                             f"truncated download). Nothing was kept; try again.")
    dest = atomic_write(dest, lambda fh: (fetch or _fetch)(url, fh), verify=verify)
    return dest


#: where the four raw MNIST files are served (torchvision's mirrors), tried in order
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")


def fetch_mnist(dest: str | os.PathLike | None = None, *, mirrors=MNIST_MIRRORS, fetch=None, log=None) -> Path:
    """Download the four raw MNIST files into ``dest`` (default ``<repo>/data/mnist``, which
    :func:`mnist_root` searches), each md5-verified (:data:`MNIST_FILES`) and written atomically;
    files already there and intact are kept. Returns the folder. ``fetch(url, fh)`` replaces the
    network (tests). Raises the last mirror's error when a file cannot be fetched from any."""
    folder = Path(dest) if dest is not None else _REPO_ROOT / "data" / "mnist"
    for fname, md5 in MNIST_FILES.values():
        target = folder / fname
        if target.is_file() and md5sum(target) == md5:
            continue
        err = None
        for base in mirrors:
            try:
                download(base + fname, target, md5=md5, fetch=fetch)
                if log:
                    log(f"  {fname}: {base}")
                err = None
                break
            except Exception as e:  # noqa: BLE001 -- try the next mirror
                err = e
        if err is not None:
            raise err
    return folder


def _atomic_savez(path: Path, **arrays) -> Path:
    """Compressed ``.npz``, atomically (:func:`kit._io.atomic_write`)."""
    return atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))


def _offline() -> bool:
    return os.environ.get("KIT_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


# =============================================================================================
# 6. MNIST-rot, official archive (Larochelle et al. 2007)
# =============================================================================================

MNIST_ROT_FILE = "mnist_rotation_new.zip"
MNIST_ROT_URL = "http://www.iro.umontreal.ca/~lisa/icml2007data/mnist_rotation_new.zip"
MNIST_ROT_SHA1 = "e67f72fa42029f62fd8eb92b0638c1b9761c9a63"
#: archive member -> rows: the 10k train + 2k validation rows, and the 50k test rows.
MNIST_ROT_MEMBERS = {"train_valid": ("mnist_all_rotation_normalized_float_train_valid.amat", 12000),
                     "test": ("mnist_all_rotation_normalized_float_test.amat", 50000)}
MNIST_ROT_TRAIN = 10000   # first rows of train_valid are the training set, the last 2000 validation
_MNIST_ROT_CACHE = "mnist_rot_official.npz"


def parse_amat(fh, rows: int | None = None, name: str = "amat") -> tuple[np.ndarray, np.ndarray]:
    """Parse ``.amat`` text (one row per digit: 784 floats in [0, 1], then the label) from an open
    file or a path. Returns float32 images ``(N, 28, 28)`` (row-major reshape, as in the papers'
    code) and int64 labels. Raises ``ValueError`` on a wrong column or row count."""
    arr = np.loadtxt(fh, dtype=np.float32, ndmin=2)
    if arr.shape[1] != 785:
        raise ValueError(f"{name}: expected 785 columns (784 pixels + label), got {arr.shape[1]}")
    if rows is not None and arr.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows, got {arr.shape[0]} (truncated file?)")
    labels = arr[:, -1]
    if not np.all(labels == np.round(labels)) or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{name}: labels must be integers 0..9")
    return np.ascontiguousarray(arr[:, :784].reshape(-1, 28, 28)), labels.astype(np.int64)


def mnist_rot_archive(root: str | os.PathLike | None = None, *, download: bool = True,
                      url: str = MNIST_ROT_URL, fetch=None) -> Path:
    """Path of the verified official archive: found in :func:`data_dirs` (the folder or its
    ``mnist_rot/`` subfolder), else downloaded into :func:`cache_dir`. Raises
    :class:`DataNotFoundError` naming the file and the folder to put it in when it is missing and
    cannot be downloaded, and ``ValueError`` when a found file fails its checksum."""
    for d in data_dirs(root):
        for c in (d / MNIST_ROT_FILE, d / "mnist_rot" / MNIST_ROT_FILE):
            if c.is_file():
                actual = sha1sum(c)
                if actual != MNIST_ROT_SHA1:
                    raise ValueError(f"checksum mismatch for {c}: expected sha1 {MNIST_ROT_SHA1}, got "
                                     f"{actual}; delete it (it is corrupt or truncated) and download again")
                return c
    target = cache_dir(root) / MNIST_ROT_FILE
    why = ("downloading is disabled (KIT_OFFLINE is set)" if _offline() else
           "downloading is disabled (download=False)" if not download else None)
    if why is None:
        try:
            return globals()["download"](url, target, MNIST_ROT_SHA1, fetch=fetch)
        except ValueError:
            raise
        except Exception as e:   # offline, DNS, HTTP error ...
            why = f"the download from {url} failed ({type(e).__name__}: {e})"
    searched = "\n  ".join(str(d) for d in data_dirs(root))
    raise DataNotFoundError(
        f"{MNIST_ROT_FILE} (official MNIST-rot, sha1 {MNIST_ROT_SHA1}) not found and {why}. Download it "
        f"from {url} and put it in the folder {target.parent} (or in $KIT_DATA). Searched:\n  {searched}\n"
        f"Offline, use the dataset 'mnist-rot-rebuilt' (built from raw MNIST, labelled 'rebuilt').")


def load_mnist_rot(root: str | os.PathLike | None = None, *, download: bool = True, fetch=None) -> dict:
    """The official MNIST-rot as numpy arrays: ``train_valid_images`` ``(12000, 28, 28)`` float32,
    ``train_valid_labels``, ``test_images`` ``(50000, 28, 28)``, ``test_labels``.

    The ``.amat`` text is parsed once and cached as ``mnist_rot_official.npz`` in :func:`cache_dir`
    (written atomically, keyed on the archive's SHA1); later calls read the cache.
    """
    cache = cache_dir(root) / _MNIST_ROT_CACHE
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["source_sha1"]) == MNIST_ROT_SHA1:
                return {k: z[k] for k in z.files if k != "source_sha1"}
    archive = mnist_rot_archive(root, download=download, fetch=fetch)
    out = {}
    with zipfile.ZipFile(archive) as zf:
        names = {Path(n).name: n for n in zf.namelist()}
        for key, (member, rows) in MNIST_ROT_MEMBERS.items():
            if member not in names:
                raise ValueError(f"{archive}: member {member} missing (members: {sorted(names)})")
            with zf.open(names[member]) as fh:
                out[f"{key}_images"], out[f"{key}_labels"] = parse_amat(fh, rows, name=member)
    _atomic_savez(cache, source_sha1=np.array(MNIST_ROT_SHA1), **out)
    return out


# =============================================================================================
# 7. MNIST-rot, rebuilt from raw MNIST (same protocol, offline)
# =============================================================================================

REBUILT_SEED = 2007
#: the rebuilt split sizes: 10k train + 2k validation (the 12k of the official archive) / 50k test
REBUILT_SIZES = {"train": 10000, "val": 2000, "test": 50000}


@functools.lru_cache(maxsize=2)
def _rebuilt_draw(seed: int, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    n_pool = MNIST_SPLITS["train"] + MNIST_SPLITS["test"]
    n = sum(REBUILT_SIZES.values())
    rng = np.random.default_rng(seed)
    idx = rng.choice(n_pool, size=n, replace=False).astype(np.int64)
    ang = rng.uniform(0.0, 360.0, size=n).astype(np.float32)
    ang = np.where(ang >= np.float32(360.0), np.float32(0.0), ang).astype(np.float32)
    return idx, ang


def mnist_rot_rebuilt(split: str = "train", n: int | None = None, *, seed: int = REBUILT_SEED,
                      root: str | os.PathLike | None = None) -> dict:
    """Rotated MNIST **rebuilt** with the MNIST-rot protocol (label it "rebuilt" wherever shown).

    62,000 digits are drawn without replacement from the 70,000 raw MNIST digits (train then test
    files, indices 0..69999) with ``numpy.random.default_rng(seed)``, each with its own angle
    uniform in [0, 360) degrees; the first 10,000 are ``'train'``, the next 2,000 ``'val'``, the
    last 50,000 ``'test'`` (``'trainval'``: the first 12,000). Only the first ``n`` digits of the
    split are rotated (cheap subsets). Returns ``images`` float32 ``(n, 28, 28)`` in [0, 1],
    ``labels``, ``angles_deg``, ``source_index`` (into the 70k pool).
    """
    offsets = {"train": (0, 10000), "val": (10000, 12000), "trainval": (0, 12000), "test": (12000, 62000)}
    if split not in offsets:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(offsets)}")
    a, b = offsets[split]
    if n is not None:
        if not 0 <= int(n) <= b - a:
            raise ValueError(f"n must be in 0..{b - a} for the rebuilt {split!r} split, got {n}")
        b = a + int(n)
    idx, ang = _rebuilt_draw(int(seed), None if root is None else str(root))
    idx, ang = idx[a:b], ang[a:b]
    tr_img, tr_lab = load_mnist_raw("train", root=root)
    te_img, te_lab = load_mnist_raw("test", root=root)
    ntr = len(tr_img)
    in_tr = idx < ntr
    raw = np.empty((len(idx), 28, 28), dtype=np.uint8)
    lab = np.empty(len(idx), dtype=np.int64)
    raw[in_tr], lab[in_tr] = tr_img[idx[in_tr]], tr_lab[idx[in_tr]]
    raw[~in_tr], lab[~in_tr] = te_img[idx[~in_tr] - ntr], te_lab[idx[~in_tr] - ntr]
    return {"images": rotate_digits(raw, ang.astype(np.float64)), "labels": lab,
            "angles_deg": ang, "source_index": idx}


# =============================================================================================
# 8. CIFAR-10 / CIFAR-100 through torchvision
# =============================================================================================

#: per-channel (mean, std) on [0, 1] images; "e4": the E4-Net recipe (Normalize of its train.py)
CIFAR_NORMALISATION = {
    "e4": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "separable-cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_FILES = {  # name -> (archive, extracted folder, URL, md5 of the archive)
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


def stratified_indices(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a class-stratified random subset: ``round(fraction * n_c)`` of every class ``c``,
    drawn with ``default_rng(seed)``, returned sorted."""
    labels = np.asarray(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(labels == c), size=int(round(fraction * np.sum(labels == c))),
                       replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def load_cifar(name: str = "cifar10", split: str = "train", *, root: str | os.PathLike | None = None,
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10/100 ``split`` ('train' 50k, 'test' 10k) through torchvision: uint8 ``(N, 3, 32, 32)``
    and int64 labels (CIFAR-100: the 100 fine labels). torchvision checks the files' MD5.

    Looks in every folder of :func:`data_dirs` (and its ``cifar/`` subfolder); with ``download``
    it downloads into ``cache_dir()/cifar``. Missing offline: :class:`DataNotFoundError` naming the
    archive and the folder.
    """
    if name not in _CIFAR_FILES:
        raise ValueError(f"unknown CIFAR {name!r}; valid: {', '.join(_CIFAR_FILES)}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid splits: 'train', 'test'")
    from .._compat import import_torchvision
    tv = import_torchvision()
    cls = tv.datasets.CIFAR10 if name == "cifar10" else tv.datasets.CIFAR100
    archive, folder, url, md5 = _CIFAR_FILES[name]

    def read(c: Path):
        try:
            ds = cls(str(c), train=split == "train", download=False)
        except RuntimeError as e:
            raise ValueError(f"{c / folder}: {e} (torchvision's MD5 check failed; delete the folder and "
                             f"download again)") from None
        return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)

    def extract(tar: Path, into: Path):
        import tarfile
        verify_file(tar, md5)
        with tarfile.open(tar) as tf:
            tf.extractall(into, filter="data")

    for d in data_dirs(root):
        for c in (d, d / "cifar"):
            if (c / folder).is_dir():
                return read(c)
            if (c / archive).is_file():
                dest = cache_dir(root) / "cifar"
                extract(c / archive, dest)
                return read(dest)
    target = cache_dir(root) / "cifar"
    if download and not _offline():
        try:
            extract(globals()["download"](url, target / archive, md5=md5), target)
            return read(target)
        except ValueError:
            raise
        except Exception as e:  # offline, DNS, HTTP error
            why = f"the download from {url} failed ({type(e).__name__}: {e})"
    else:
        why = "downloading is disabled" + (" (KIT_OFFLINE is set)" if _offline() else " (download=False)")
    raise DataNotFoundError(
        f"{name} not found ({archive}, or its extracted {folder}/ folder) and {why}. Put {archive} "
        f"(md5 {md5}, from {url}) or the extracted {folder}/ folder in the folder {target} (or set "
        f"KIT_DATA to a folder holding it).")


# =============================================================================================
# 9. Synthetic data for tests
# =============================================================================================

def synthetic(n: int, *, seed: int = 0, shape=(1, 28, 28), num_classes: int = 10,
              noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny learnable dataset: ``n`` images ``shape`` = class template (fixed by ``shape`` and
    ``num_classes``, not by ``seed``) + Gaussian noise; labels cycle through the classes and are
    shuffled with ``seed``. Float32 images, int64 labels."""
    g = torch.Generator().manual_seed(12345)
    templates = torch.rand((num_classes, *shape), generator=g)
    g.manual_seed(int(seed))
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    images = templates[labels] + noise * torch.randn((n, *shape), generator=g)
    return images.float(), labels.long()


# =============================================================================================
# 10. One entry point: load_dataset(name) -> DataBundle
# =============================================================================================

class TensorData(torch.utils.data.Dataset):
    """An in-memory split: ``images`` ``(N, C, H, W)`` (uint8 scaled by 1/255, or float), int64
    ``labels``, normalised on access with per-channel ``mean`` / ``std``. ``batch(idx)`` returns
    ``(x, y)`` for an index tensor at once (what the training loop uses)."""

    def __init__(self, images, labels, mean=None, std=None):
        self.images = torch.as_tensor(images)
        if self.images.dim() == 3:
            self.images = self.images[:, None]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        c = self.images.shape[1]
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1)

    def __len__(self):
        return len(self.labels)

    def batch(self, idx):
        x = self.images[idx]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x, self.labels[idx]

    def __getitem__(self, i):
        x, y = self.batch(torch.as_tensor([i]))
        return x[0], y[0]

    def subset(self, n: int | None):
        if n is None or n >= len(self):
            return self
        out = TensorData.__new__(TensorData)
        out.images, out.labels, out.mean, out.std = self.images[:n], self.labels[:n], self.mean, self.std
        return out


@dataclass
class DataBundle:
    """Train / validation (or ``None``) / test splits and ``info``: ``name``, ``label`` (human
    readable; contains "rebuilt" for rebuilt data), ``rebuilt``, ``num_classes``, ``input_shape``,
    ``sizes``, ``normalisation``."""
    train: TensorData
    val: TensorData | None
    test: TensorData
    info: dict = field(default_factory=dict)


def _channel_stats(images: torch.Tensor):
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.dim() == 3:
        x = x[:, None]
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


def _resolve_norm(normalise, name, train_images):
    """``None``/"none" -> no normalisation; "train": per-channel mean/std of the training split;
    a key of :data:`CIFAR_NORMALISATION`; or an explicit ``(mean, std)`` pair."""
    if normalise is None or normalise == "none":
        return None, None, "none"
    if normalise == "train":
        m, s = _channel_stats(train_images)
        return m, s, "train mean/std"
    if isinstance(normalise, str):
        if normalise not in CIFAR_NORMALISATION:
            raise ValueError(f"unknown normalisation {normalise!r}; valid: 'none', 'train', "
                             f"{', '.join(map(repr, CIFAR_NORMALISATION))} or a (mean, std) pair")
        m, s = CIFAR_NORMALISATION[normalise]
        return m, s, normalise
    m, s = normalise
    m = (m,) if isinstance(m, (int, float)) else tuple(m)
    s = (s,) if isinstance(s, (int, float)) else tuple(s)
    return m, s, f"mean {m}, std {s}"


def _val_holdout(labels, n_val: int, seed: int):
    """Stratified hold-out of ``n_val`` training rows: (train_idx, val_idx)."""
    val = stratified_indices(labels, n_val / len(labels), seed=seed + 1) if n_val else np.array([], np.int64)
    mask = np.ones(len(labels), bool)
    mask[val] = False
    return np.flatnonzero(mask), val


def _mnist_rot_official(*, val, root, download, **_):
    d = load_mnist_rot(root, download=download)
    tv_i, tv_l = d["train_valid_images"], d["train_valid_labels"]
    k = MNIST_ROT_TRAIN if val else len(tv_i)
    return dict(train=(tv_i[:k], tv_l[:k]), val=(tv_i[k:], tv_l[k:]) if val else None,
                test=(d["test_images"], d["test_labels"]), label="MNIST-rot (official, Larochelle et al. 2007)",
                rebuilt=False, num_classes=10)


def _mnist_rot_rebuilt(*, val, root, subsets, seed_data, **_):
    ntr, nva, nte = subsets
    if val:
        tr = mnist_rot_rebuilt("train", ntr, seed=seed_data, root=root)
        va = mnist_rot_rebuilt("val", nva, seed=seed_data, root=root)
    else:
        tr, va = mnist_rot_rebuilt("trainval", ntr, seed=seed_data, root=root), None
    te = mnist_rot_rebuilt("test", nte, seed=seed_data, root=root)
    return dict(train=(tr["images"], tr["labels"]), val=(va["images"], va["labels"]) if va else None,
                test=(te["images"], te["labels"]), num_classes=10, rebuilt=True,
                label=f"MNIST-rot (rebuilt from raw MNIST, seed {seed_data})")


def _cifar(which):
    def load(*, val, root, download, fraction, seed_data, **_):
        tr_i, tr_l = load_cifar(which, "train", root=root, download=download)
        te_i, te_l = load_cifar(which, "test", root=root, download=download)
        keep = stratified_indices(tr_l, fraction, seed=seed_data)
        tr_i, tr_l = tr_i[keep], tr_l[keep]
        va = None
        if val:
            t_idx, v_idx = _val_holdout(tr_l, int(round(0.1 * len(tr_l))), seed_data)
            va = (tr_i[v_idx], tr_l[v_idx])
            tr_i, tr_l = tr_i[t_idx], tr_l[t_idx]
        frac = "" if fraction == 1 else f", stratified {fraction:g} of the training set"
        return dict(train=(tr_i, tr_l), val=va, test=(te_i, te_l), rebuilt=False,
                    num_classes=10 if which == "cifar10" else 100,
                    label=f"{'CIFAR-10' if which == 'cifar10' else 'CIFAR-100'}{frac}")
    return load


def _synthetic(*, val, seed_data, subsets, **_):
    ntr, nva, nte = (s if s is not None else d for s, d in zip(subsets, (256, 64, 128)))
    tr = synthetic(ntr, seed=seed_data)
    va = synthetic(nva, seed=seed_data + 1) if val else None
    te = synthetic(nte, seed=seed_data + 2)
    return dict(train=tr, val=va, test=te, rebuilt=False, num_classes=10, label="synthetic (tests)")


def _mnist_rot_sample(*, val, subsets, **_):
    from .sample import load_sample
    s = load_sample()
    x, y = s["images"][:, 0].numpy(), s["labels"].numpy()               # (500, 28, 28) in [0, 1]
    n_tr = 300 if val else 400
    tr, va, te = (x[:n_tr], y[:n_tr]), ((x[300:400], y[300:400]) if val else None), (x[400:], y[400:])
    return dict(train=tr, val=va, test=te, rebuilt=True, num_classes=10,
                label="the bundled 500-digit sample of rebuilt MNIST-rot (kit/assets): a smoke test, not a benchmark")


def has_raw_mnist(root: str | os.PathLike | None = None) -> bool:
    """True when the four raw MNIST files are found (:func:`mnist_root`)."""
    try:
        mnist_root(root)
        return True
    except FileNotFoundError:
        return False


def resolve_dataset(name: str, root: str | os.PathLike | None = None) -> str:
    """``"auto"``: ``"mnist-rot-rebuilt"`` where raw MNIST is found (``KIT_DATA``, ``<repo>/data``,
    ``../shared/data``; ``python -m kit data fetch mnist`` puts it there), else the bundled
    ``"mnist-rot-sample"``, so that a clone alone runs every quick profile. Other names unchanged."""
    if name != "auto":
        return name
    return "mnist-rot-rebuilt" if has_raw_mnist(root) else "mnist-rot-sample"


#: dataset name -> (loader, default normalisation, one-line description); "auto" -> :func:`resolve_dataset`
DATASETS = {
    "mnist-rot": (_mnist_rot_official, None, "official MNIST-rot archive: 10k train + 2k val / 50k test"),
    "mnist-rot-rebuilt": (_mnist_rot_rebuilt, None, "MNIST-rot rebuilt offline from raw MNIST: 10k + 2k / 50k"),
    "cifar10": (_cifar("cifar10"), "e4", "CIFAR-10 through torchvision (E4 normalisation)"),
    "cifar100": (_cifar("cifar100"), "e4", "CIFAR-100 through torchvision (E4 normalisation)"),
    "mnist-rot-sample": (_mnist_rot_sample, None, "the bundled 500 rebuilt MNIST-rot digits: 300 + 100 / 100 "
                                                  "(no download; a smoke test)"),
    "synthetic": (_synthetic, None, "tiny learnable synthetic images (tests): 256 / 64 / 128"),
}


def load_dataset(name: str, *, val: bool = True, train_subset: int | None = None, val_subset: int | None = None,
                 test_subset: int | None = None, fraction: float = 1.0, normalise="default",
                 seed: int | None = None, root: str | os.PathLike | None = None,
                 download: bool = True) -> DataBundle:
    """Load dataset ``name`` (see :data:`DATASETS`) as a :class:`DataBundle`.

    ``val``: hold out a validation split (MNIST-rot: the 2k validation rows; CIFAR: a stratified
    10 % of the training set); ``val=False`` trains on the whole training pool as the papers do.
    ``*_subset``: keep only the first ``n`` rows of a split (quick runs). ``fraction``: stratified
    fraction of the CIFAR training set. ``normalise``: "default" (the dataset's), "none", "train",
    a key of :data:`CIFAR_NORMALISATION` or ``(mean, std)``. ``seed``: the data seed of the
    rebuilt / synthetic / fractional data (default: the dataset's fixed seed).
    """
    asked, name = name, resolve_dataset(name, root)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: auto, {', '.join(DATASETS)}")
    if fraction != 1.0 and not name.startswith("cifar"):
        raise ValueError(f"fraction is only supported for CIFAR datasets, not {name!r}")
    loader, default_norm, _ = DATASETS[name]
    seed_data = (REBUILT_SEED if name == "mnist-rot-rebuilt" else 0) if seed is None else int(seed)
    raw = loader(val=val, root=root, download=download, fraction=fraction, seed_data=seed_data,
                 subsets=(train_subset, val_subset, test_subset))
    tr_i, tr_l = raw["train"]
    mean, std, norm_label = _resolve_norm(default_norm if normalise == "default" else normalise, name,
                                          torch.as_tensor(tr_i))
    splits = {}
    for key, n in (("train", train_subset), ("val", val_subset), ("test", test_subset)):
        if raw[key] is None:
            splits[key] = None
            continue
        splits[key] = TensorData(torch.as_tensor(raw[key][0]), raw[key][1], mean, std).subset(n)
    label = raw["label"] if asked == name else f"{raw['label']} (dataset 'auto')"
    info = dict(name=name, label=label, rebuilt=raw["rebuilt"], num_classes=raw["num_classes"],
                input_shape=tuple(splits["train"].images.shape[1:]), normalisation=norm_label,
                sizes={k: (len(v) if v is not None else 0) for k, v in splits.items()})
    return DataBundle(splits["train"], splits["val"], splits["test"], info)
