"""Raw MNIST loading, the vectorised MNIST-rot rotation and the bundled sample (kit.data, kit.data.sample)."""
from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from kit import data, groups
from kit.data import sample


def _raw_folder_or_skip():
    try:
        return data.mnist_root()
    except FileNotFoundError as e:
        pytest.skip(f"raw MNIST files not found (set KIT_DATA to run this test): {e}")


def _write_idx(path, arr: np.ndarray, code: int, compress: bool) -> None:
    payload = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


# ------------------------------------------------------------------------------------- IDX format
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C),
                                        (np.float32, 0x0D), (np.float64, 0x0E)])
def test_read_idx_round_trip(tmp_path, dtype, code, compress):
    rng = np.random.default_rng(0)
    arr = (rng.integers(-100, 200, size=(3, 4, 5)) if dtype != np.uint8
           else rng.integers(0, 256, size=(3, 4, 5))).astype(dtype)
    p = tmp_path / "a.idx"
    _write_idx(p, arr, code, compress)
    out = data.read_idx(p)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 1  # writable


def test_read_idx_rejects_malformed(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good.idx"
    _write_idx(good, arr, 0x08, compress=False)
    raw = good.read_bytes()
    cases = {
        "truncated": raw[:-1],
        "trailing": raw + b"\x00",
        "header": raw[:10],            # 3 dims need a 16-byte header
        "magic": b"\x01" + raw[1:],
        "code": raw[:2] + b"\x07" + raw[3:],
    }
    for name, blob in cases.items():
        for compress in (False, True):
            p = tmp_path / f"{name}{'.gz' if compress else ''}"
            p.write_bytes(gzip.compress(blob) if compress else blob)
            with pytest.raises(ValueError, match="IDX"):
                data.read_idx(p)
    bad_gz = tmp_path / "cut.gz"
    bad_gz.write_bytes(gzip.compress(raw)[:-6])
    with pytest.raises(ValueError, match="gzip"):
        data.read_idx(bad_gz)


def test_verify_file_names_expected_and_actual(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"eqkit")
    actual = hashlib.md5(b"eqkit").hexdigest()
    assert data.md5sum(p) == actual
    assert data.verify_file(p, actual.upper()) == p
    wrong = "0" * 32
    with pytest.raises(ValueError) as e:
        data.verify_file(p, wrong)
    msg = str(e.value)
    assert wrong in msg and actual in msg and "f.bin" in msg


# ------------------------------------------------------------------------------ locating raw MNIST
def test_mnist_root_honours_kit_data(tmp_path, monkeypatch):
    real = _raw_folder_or_skip()
    base = tmp_path / "data"
    (base / "mnist").mkdir(parents=True)
    for fname, _ in data.MNIST_FILES.values():
        (base / "mnist" / fname).symlink_to(real / fname)
    monkeypatch.setenv("KIT_DATA", str(base))                      # parent with a mnist/ subfolder
    assert data.mnist_root() == (base / "mnist").resolve()
    monkeypatch.setenv("KIT_DATA", str(base / "mnist"))            # the folder itself
    assert data.mnist_root() == (base / "mnist").resolve()
    assert data.mnist_root(base) == (base / "mnist").resolve()     # explicit root wins
    images, labels = data.load_mnist_raw("test")                   # loads through KIT_DATA
    assert images.shape == (10000, 28, 28)


def test_mnist_root_error_names_kit_data(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("KIT_DATA", str(empty))
    monkeypatch.setattr(data, "_REPO_ROOT", tmp_path / "repo")      # hide ../shared/data/mnist
    monkeypatch.chdir(empty)
    with pytest.raises(FileNotFoundError) as e:
        data.mnist_root()
    msg = str(e.value)
    assert "KIT_DATA" in msg and str(empty.resolve()) in msg
    assert all(fname in msg for fname, _ in data.MNIST_FILES.values())
    with pytest.raises(FileNotFoundError, match="KIT_DATA"):
        data.mnist_root(empty)                                     # explicit root: no fallback


# -------------------------------------------------------------------------------------- raw MNIST
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_load_mnist_raw(split, n):
    _raw_folder_or_skip()
    images, labels = data.load_mnist_raw(split)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9 and len(np.unique(labels)) == 10
    assert images.max() == 255 and images.min() == 0
    assert data.load_mnist_raw(split)[0] is images                 # cached in-process
    assert not images.flags.writeable                              # the cache cannot be corrupted


def test_load_mnist_raw_bad_split():
    with pytest.raises(ValueError, match="'train', 'test'"):
        data.load_mnist_raw("validation")


# --------------------------------------------------------------------------------- rotate_digits
@pytest.fixture(scope="module")
def digits():
    return sample.load_sample()["images"][:32, 0]                 # real digits, float in [0, 1]


def test_rotate_digits_identity_and_uint8(digits):
    out = data.rotate_digits(digits, np.zeros(len(digits)))
    assert out.dtype == torch.float32 and out.shape == digits.shape
    assert torch.equal(out, digits)
    u8 = (digits * 255).round().to(torch.uint8)
    assert torch.equal(data.rotate_digits(u8.numpy(), 0.0), u8.float() / 255)


def test_rotate_digits_quarter_turns_match_rot90(digits):
    for k in (1, 2, 3):
        expected = torch.rot90(digits, k, dims=(-2, -1))
        assert torch.equal(data.rotate_digits(digits, [90.0 * k] * len(digits)), expected)
        assert torch.equal(data.rotate_digits(digits, 90.0 * k - 360.0), expected)
    # the interpolating path (angle a hair off 90) turns the same way: counter-clockwise
    near = data.rotate_digits(digits, 90.0 + 1e-7)
    assert (near - torch.rot90(digits, 1, dims=(-2, -1))).abs().max() < 1e-5
    assert (near - torch.rot90(digits, -1, dims=(-2, -1))).abs().max() > 0.5


def test_rotate_digits_direction_single_pixel():
    x = torch.zeros(1, 28, 28)
    x[0, 13, 20] = 1.0                      # right of the centre (x = +6.5, y = +0.5)
    y = data.rotate_digits(x, [89.999])     # counter-clockwise: to above the centre
    assert torch.nonzero(y[0] > 0.5).tolist() == [[7, 13]]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_rotate_digits_matches_groups_rotate_image(digits, mode):
    angles = np.random.default_rng(1).uniform(0, 360, len(digits))
    angles[:2] = 30.0
    out = data.rotate_digits(digits, angles, mode=mode)
    ref = torch.stack([groups.rotate_image(d, float(a), mode=mode) for d, a in zip(digits, angles)])
    torch.testing.assert_close(out, ref.clamp(0, 1), atol=1e-6, rtol=0)
    assert 0.0 <= out.min() and out.max() <= 1.0
    batch30 = data.rotate_digits(digits, 30.0, mode=mode)
    torch.testing.assert_close(batch30, torch.stack([groups.rotate_image(d, 30.0, mode=mode)
                                                     for d in digits]).clamp(0, 1), atol=1e-6, rtol=0)


def test_rotate_digits_bad_input(digits):
    with pytest.raises(ValueError, match="angles"):
        data.rotate_digits(digits, [10.0, 20.0])
    with pytest.raises(ValueError, match="mode"):
        data.rotate_digits(digits, 10.0, mode="lanczos")
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        data.rotate_digits(digits[0], 10.0)


def test_rotated_mnist_protocol():
    _raw_folder_or_skip()
    d = data.rotated_mnist(64, seed=5, split="test")
    assert d["images"].shape == (64, 28, 28) and d["images"].dtype == torch.float32
    assert len(set(d["source_index"].tolist())) == 64                  # without replacement
    assert d["angles_deg"].dtype == np.float32
    assert ((d["angles_deg"] >= 0) & (d["angles_deg"] < 360)).all()
    images, labels = data.load_mnist_raw("test")
    np.testing.assert_array_equal(d["labels"], labels[d["source_index"]])
    i = 3
    ref = groups.rotate_image(torch.from_numpy(images[d["source_index"][i]].astype(np.float32)) / 255,
                              float(d["angles_deg"][i]))
    torch.testing.assert_close(d["images"][i], ref, atol=1e-6, rtol=0)
    again = data.rotated_mnist(64, seed=5, split="test")
    assert torch.equal(again["images"], d["images"])
    assert not np.array_equal(data.rotated_mnist(64, seed=6, split="test")["source_index"],
                              d["source_index"])


# -------------------------------------------------------------------------------- bundled sample
def test_bundled_sample_contents():
    path = sample.sample_path()
    assert path.stat().st_size < 1_000_000
    s = sample.load_sample()
    assert s["images"].shape == (500, 1, 28, 28) and s["images"].dtype == torch.float32
    assert 0.0 <= s["images"].min() and s["images"].max() <= 1.0
    assert s["labels"].dtype == torch.long and set(s["labels"].tolist()) == set(range(10))
    assert ((s["angles"] >= 0) & (s["angles"] < 360)).all()
    assert len(set(s["source_index"].tolist())) == 500
    d = sample.digit(7)
    assert d.shape == (1, 1, 28, 28) and torch.equal(d, s["images"][7:8])
    with pytest.raises(IndexError):
        sample.digit(500)


def test_bundled_sample_rebuilds_exactly(tmp_path):
    root = _raw_folder_or_skip()
    out = sample.build_sample(out=tmp_path / "rebuilt.npz", root=root)
    assert out == tmp_path / "rebuilt.npz"
    assert [p.name for p in tmp_path.iterdir()] == ["rebuilt.npz"]   # no temp file left behind
    with np.load(out) as new, np.load(sample.sample_path()) as old:
        assert sorted(new.files) == sorted(old.files) == ["angles", "images", "labels", "source_index"]
        for k in old.files:
            assert new[k].dtype == old[k].dtype, k
            np.testing.assert_array_equal(new[k], old[k], err_msg=k)
        assert old["images"].dtype == np.uint8 and old["labels"].dtype == np.uint8
        assert old["angles"].dtype == np.float32 and old["source_index"].dtype == np.int32
    # the stored digits are the raw test digits they claim to be
    images, labels = data.load_mnist_raw("test")
    with np.load(out) as new:
        np.testing.assert_array_equal(new["labels"], labels[new["source_index"]])


def test_sample_cli(tmp_path):
    root = _raw_folder_or_skip()
    out = tmp_path / "cli.npz"
    assert sample.main(["--out", str(out), "--root", str(root)]) == 0
    with np.load(out) as z:
        assert z["images"].shape == (500, 28, 28)
