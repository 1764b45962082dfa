"""Atomic file writes: the one helper every writer of the kit uses (checkpoints, manifests, metrics,
figures, tables, datasets, downloads, stencil caches).

A reader sees the old file or the new one, never a half-written file: the bytes go to a temporary
file in the destination's folder, are flushed to disk, and are moved into place with ``os.replace``.
On any error (or a failed ``verify``) the temporary file is removed and nothing changes at ``path``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_savefig", "file_digest", "KIT_DIR",
           "REPO_DIR"]

#: the package folder (``kit/``, holding the data files ``assets/`` and ``weights/``) and the checkout above it
KIT_DIR = Path(__file__).resolve().parent
REPO_DIR = KIT_DIR.parent


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                 verify: Callable[[Path], None] | None = None) -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a binary temporary file; ``verify(tmp_path)``,
    if given, may raise to reject it (e.g. a checksum). Returns ``path``; the file is mode 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if verify is not None:
            verify(Path(tmp))
        os.chmod(tmp, 0o644)                      # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (ending in exactly one newline), atomically."""
    return atomic_write(path, lambda fh: fh.write((text.rstrip("\n") + "\n").encode()))


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int = 1, default=None) -> Path:
    """``obj`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default))


def atomic_savefig(fig, path: str | os.PathLike, *, dpi: int = 120, format: str | None = None) -> Path:
    """A matplotlib figure (PNG by default, or the path's suffix), atomically."""
    fmt = format or (Path(path).suffix.lstrip(".") or "png")
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi, bbox_inches="tight"))


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", *, chunk_size: int = 1 << 20) -> str:
    """Hex digest (``md5``, ``sha1``, ``sha256``, ...) of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def name_matches(name: str, pattern: str | None) -> bool:
    """Whether ``name`` matches ``pattern``: a glob, or several comma-separated globs (``'p4*,e4-*'``);
    ``None`` matches everything. The one rule behind every ``--only`` option (bench, sweep, zoo export)."""
    import fnmatch
    if pattern is None:
        return True
    return any(fnmatch.fnmatch(name, p.strip()) for p in pattern.split(",") if p.strip())
