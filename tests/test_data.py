"""Datasets of kit.data: atomic checksum-verified downloads, the official MNIST-rot archive (a small
fake archive stands in for it), rebuilt MNIST-rot, CIFAR offline errors, stratified fractions,
synthetic data and the one entry point. Never touches the network."""
from __future__ import annotations

import hashlib
import io
import urllib.error
import zipfile

import numpy as np
import pytest
import torch

from kit import data


def _folder_files(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------- downloads
def test_download_verifies_and_is_atomic(tmp_path):
    payload = b"eqkit" * 1000
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    dest = tmp_path / "dl" / "file.bin"
    good = hashlib.sha1(payload).hexdigest()
    assert data.download(src.as_uri(), dest, good) == dest and dest.read_bytes() == payload
    assert _folder_files(dest.parent) == ["file.bin"]
    dest.unlink()
    # truncated (file:// URL) and corrupted (monkeypatched fetch) transfers: rejected, nothing left
    src.write_bytes(payload[:-7])
    with pytest.raises(ValueError, match="checksum mismatch.*expected sha1"):
        data.download(src.as_uri(), dest, good)
    assert _folder_files(dest.parent) == []

    def corrupt(url, fh):
        fh.write(payload[:100] + b"X" + payload[101:])
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.download("http://example.invalid/file.bin", dest, good, fetch=corrupt)
    assert _folder_files(dest.parent) == []

    def broken(url, fh):                     # a connection that dies half-way
        fh.write(payload[:10])
        raise ConnectionResetError("peer went away")
    with pytest.raises(ConnectionResetError):
        data.download("http://example.invalid/file.bin", dest, good, fetch=broken)
    assert _folder_files(dest.parent) == []
    with pytest.raises(ValueError, match="md5"):
        data.download(src.as_uri(), dest, md5="0" * 32)


def _amat(rng, n):
    imgs = rng.random((n, 784)).round(6)
    labels = rng.integers(0, 10, n)
    buf = io.StringIO()
    np.savetxt(buf, np.column_stack([imgs, labels]), fmt="%.6g")
    return buf.getvalue().encode(), imgs.reshape(n, 28, 28).astype(np.float32), labels


@pytest.fixture
def fake_mnist_rot(tmp_path, monkeypatch):
    """A tiny archive with the official layout (7 + 3 train_valid rows, 5 test rows)."""
    rng = np.random.default_rng(0)
    tv, tv_i, tv_l = _amat(rng, 10)
    te, te_i, te_l = _amat(rng, 5)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(data.MNIST_ROT_MEMBERS["train_valid"][0], tv)
        zf.writestr(data.MNIST_ROT_MEMBERS["test"][0], te)
    raw = buf.getvalue()
    monkeypatch.setattr(data, "MNIST_ROT_SHA1", hashlib.sha1(raw).hexdigest())
    monkeypatch.setattr(data, "MNIST_ROT_MEMBERS", {"train_valid": (data.MNIST_ROT_MEMBERS["train_valid"][0], 10),
                                                    "test": (data.MNIST_ROT_MEMBERS["test"][0], 5)})
    monkeypatch.setattr(data, "MNIST_ROT_TRAIN", 7)
    return raw, (tv_i, tv_l, te_i, te_l)


def test_official_mnist_rot_download_parse_and_cache(tmp_path, fake_mnist_rot, monkeypatch):
    monkeypatch.delenv("KIT_OFFLINE")                    # a fake fetch stands in for the network
    raw, (tv_i, tv_l, te_i, te_l) = fake_mnist_rot
    root = tmp_path / "data"
    calls = []

    def fetch(url, fh):
        calls.append(url)
        fh.write(raw)
    d = data.load_mnist_rot(root, fetch=fetch)
    assert calls == [data.MNIST_ROT_URL]
    np.testing.assert_allclose(d["train_valid_images"], tv_i, atol=1e-6)
    np.testing.assert_array_equal(d["train_valid_labels"], tv_l)
    np.testing.assert_allclose(d["test_images"], te_i, atol=1e-6)
    assert (root / data.MNIST_ROT_FILE).is_file() and (root / "mnist_rot_official.npz").is_file()
    # second call: the parsed cache, no parsing, no download
    monkeypatch.setattr(data, "parse_amat", lambda *a, **k: pytest.fail("parsed twice"))
    d2 = data.load_mnist_rot(root, fetch=lambda *a: pytest.fail("downloaded twice"))
    np.testing.assert_array_equal(d2["test_labels"], te_l)
    # through the entry point: 7 train + 3 validation rows, not labelled rebuilt
    monkeypatch.setenv("KIT_DATA", str(root))
    b = data.load_dataset("mnist-rot")
    assert b.info["sizes"] == {"train": 7, "val": 3, "test": 5} and not b.info["rebuilt"]
    assert data.load_dataset("mnist-rot", val=False).info["sizes"] == {"train": 10, "val": 0, "test": 5}


def test_official_mnist_rot_rejects_corrupt_and_reports_offline(tmp_path, fake_mnist_rot, monkeypatch):
    monkeypatch.delenv("KIT_OFFLINE")                    # a fake fetch stands in for the network
    raw, _ = fake_mnist_rot
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.load_mnist_rot(root, fetch=lambda url, fh: fh.write(raw[:-50]))          # truncated download
    assert not (root / data.MNIST_ROT_FILE).exists() and not list(root.glob(".*part"))

    def offline(url, fh):
        raise urllib.error.URLError("Name or service not known")
    with pytest.raises(data.DataNotFoundError) as e:
        data.load_mnist_rot(root, fetch=offline)
    msg = str(e.value)
    assert data.MNIST_ROT_FILE in msg and str(root.resolve()) in msg and "mnist-rot-rebuilt" in msg
    monkeypatch.setenv("KIT_OFFLINE", "1")
    with pytest.raises(data.DataNotFoundError, match="KIT_OFFLINE"):
        data.load_mnist_rot(root, fetch=lambda *a: pytest.fail("must not download"))
    (root / data.MNIST_ROT_FILE).write_bytes(raw[:-1])                             # a corrupt local copy
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.mnist_rot_archive(root)


def test_parse_amat_rejects_bad_rows():
    with pytest.raises(ValueError, match="785 columns"):
        data.parse_amat(io.BytesIO(b"0.1 0.2 3\n0.1 0.2 4\n"))
    rng = np.random.default_rng(1)
    text, _, _ = _amat(rng, 3)
    with pytest.raises(ValueError, match="expected 4 rows"):
        data.parse_amat(io.BytesIO(text), rows=4)


# ------------------------------------------------------------------------------ rebuilt MNIST-rot
def test_rebuilt_protocol_split_and_label():
    try:
        data.mnist_root()
    except FileNotFoundError as e:
        pytest.skip(f"raw MNIST not found: {e}")
    idx, ang = data._rebuilt_draw(data.REBUILT_SEED, None)
    assert len(idx) == 62000 and len(np.unique(idx)) == 62000 and idx.max() < 70000
    assert ang.dtype == np.float32 and 0 <= ang.min() and ang.max() < 360
    a = data.mnist_rot_rebuilt("train", 20)
    b = data.mnist_rot_rebuilt("train", 5)
    torch.testing.assert_close(a["images"][:5], b["images"], rtol=0, atol=0)      # prefixes, deterministic
    assert a["images"].shape == (20, 28, 28) and 0 <= a["images"].min() and a["images"].max() <= 1
    te = data.mnist_rot_rebuilt("test", 5)
    np.testing.assert_array_equal(te["source_index"], idx[12000:12005])
    # the digit is the raw digit rotated by its angle
    raw, lab = data.load_mnist_raw("train" if idx[0] < 60000 else "test")
    j = idx[0] if idx[0] < 60000 else idx[0] - 60000
    torch.testing.assert_close(a["images"][0], data.rotate_digits(raw[j:j + 1], [float(ang[0])])[0])
    assert a["labels"][0] == lab[j]
    with pytest.raises(ValueError, match="valid splits"):
        data.mnist_rot_rebuilt("validation")
    bundle = data.load_dataset("mnist-rot-rebuilt", train_subset=8, val_subset=4, test_subset=6)
    assert bundle.info["rebuilt"] and "rebuilt" in bundle.info["label"]
    assert bundle.info["sizes"] == {"train": 8, "val": 4, "test": 6}
    x, y = bundle.train.batch(torch.arange(3))
    assert x.shape == (3, 1, 28, 28) and y.dtype == torch.long


# ----------------------------------------------------------------------------------------- CIFAR
def test_cifar_offline_error_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_OFFLINE", "1")
    with pytest.raises(data.DataNotFoundError) as e:
        data.load_cifar("cifar10", root=tmp_path, download=True)
    assert "cifar-10-python.tar.gz" in str(e.value) and str(tmp_path / "cifar") in str(e.value)
    with pytest.raises(ValueError, match="valid: cifar10, cifar100"):
        data.load_cifar("cifar1000", root=tmp_path)


def test_stratified_fraction_and_normalisation():
    labels = np.repeat(np.arange(10), 50)
    idx = data.stratified_indices(labels, 0.2, seed=3)
    assert np.bincount(labels[idx]).tolist() == [10] * 10 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, data.stratified_indices(labels, 0.2, seed=3))
    with pytest.raises(ValueError, match="fraction"):
        data.stratified_indices(labels, 0.0)
    imgs = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    mean, std = data.CIFAR_NORMALISATION["e4"]
    td = data.TensorData(imgs, [0, 1], mean, std)
    x, _ = td.batch(torch.arange(2))
    torch.testing.assert_close(x[0, :, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))


# ------------------------------------------------------------------------- synthetic, entry point
def test_synthetic_and_entry_point_errors():
    x, y = data.synthetic(30, seed=1)
    x2, y2 = data.synthetic(30, seed=1)
    assert x.shape == (30, 1, 28, 28) and torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.bincount(y).tolist() == [3] * 10
    b = data.load_dataset("synthetic", train_subset=32, val=False)
    assert b.val is None and b.info["sizes"]["train"] == 32
    with pytest.raises(ValueError, match="valid datasets: auto, mnist-rot, mnist-rot-rebuilt, cifar10"):
        data.load_dataset("mnist-rotated")
    with pytest.raises(ValueError, match="only supported for CIFAR"):
        data.load_dataset("synthetic", fraction=0.5)
    with pytest.raises(ValueError, match="valid: 'none', 'train'"):
        data.load_dataset("synthetic", normalise="imagenet")


# ------------------------------------------------------------------ data from the repository alone
def test_bundled_sample_is_a_dataset():
    """'mnist-rot-sample': the 500 bundled digits as train / val / test, labelled a smoke test."""
    from kit.data.sample import load_sample
    b = data.load_dataset("mnist-rot-sample")
    assert b.info["sizes"] == {"train": 300, "val": 100, "test": 100} and "not a benchmark" in b.info["label"]
    s = load_sample()
    assert torch.equal(b.train.images[:5], s["images"][:5]) and torch.equal(b.test.labels, s["labels"][400:])
    assert data.load_dataset("mnist-rot-sample", val=False).info["sizes"] == {"train": 400, "val": 0, "test": 100}


def test_auto_is_the_sample_without_raw_mnist_and_says_so(monkeypatch):
    def nothing(root=None):
        raise FileNotFoundError("raw MNIST not found (test)")
    monkeypatch.setattr(data, "mnist_root", nothing)
    assert data.resolve_dataset("auto") == "mnist-rot-sample" and not data.has_raw_mnist()
    b = data.load_dataset("auto", train_subset=20)
    assert b.info["name"] == "mnist-rot-sample" and "(dataset 'auto')" in b.info["label"]
    assert data.resolve_dataset("cifar10") == "cifar10"


def test_missing_raw_mnist_says_how_to_fetch_or_use_the_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_DATA", str(tmp_path))
    monkeypatch.setattr(data, "_REPO_ROOT", tmp_path / "clone")            # a clone with no shared folder beside it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        data.mnist_root()
    assert "python -m kit data fetch mnist" in str(e.value) and "mnist-rot-sample" in str(e.value)
    with pytest.raises(FileNotFoundError, match="mnist-rot-sample"):        # KIT_OFFLINE (conftest): no fetch attempt
        data.load_mnist_raw("test")
    assert data.resolve_dataset("auto") == "mnist-rot-sample"


@pytest.mark.skipif(not data.has_raw_mnist(), reason="needs the raw MNIST files to serve as the fake mirror")
def test_fetch_mnist_verifies_tries_mirrors_and_keeps_intact_files(tmp_path, monkeypatch):
    real = data.mnist_root()
    served = []

    def mirror(url, fh):                     # the second mirror serves the real bytes, the first corrupt ones
        served.append(url)
        body = (real / url.rsplit("/", 1)[1]).read_bytes()
        fh.write(body if url.startswith("https://good/") else body[:-10])
    out = data.fetch_mnist(tmp_path / "mnist", mirrors=("https://bad/", "https://good/"), fetch=mirror)
    assert sorted(p.name for p in out.iterdir()) == sorted(f for f, _ in data.MNIST_FILES.values())
    assert all(data.md5sum(out / f) == m for f, m in data.MNIST_FILES.values())
    assert len(served) == 8 and not list(out.glob(".*tmp"))
    data.fetch_mnist(out, fetch=lambda *a: pytest.fail("intact files are not fetched again"))
    # first use: a missing raw MNIST is fetched once when online, then read
    monkeypatch.delenv("KIT_OFFLINE")
    calls = []
    monkeypatch.setattr(data, "mnist_root", lambda root=None: (_ for _ in ()).throw(FileNotFoundError("absent")))
    monkeypatch.setattr(data, "fetch_mnist", lambda *a, **k: calls.append(1) or out)
    images, labels = data.load_mnist_raw("test")
    assert calls == [1] and images.shape == (10000, 28, 28)


def test_data_command_lists_the_datasets(capsys):
    from kit.__main__ import main
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "mnist-rot-sample" in out and "auto" in out and "mnist-rot-rebuilt" in out
