"""The kit's one atomic writer (kit._io) and its one timer (kit.measure.timing)."""
import os
import stat

import pytest

from kit import _io
from kit.measure import timing


def test_atomic_write_keeps_the_old_file_on_error_and_on_rejection(tmp_path):
    p = tmp_path / "sub" / "f.json"
    _io.atomic_write_json(p, {"a": 1})
    assert p.read_text() == '{\n "a": 1\n}\n' and stat.S_IMODE(os.stat(p).st_mode) == 0o644

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError, match="killed"):
        _io.atomic_write(p, boom)

    def reject(tmp):
        raise ValueError(f"bad checksum of {tmp.name}")
    with pytest.raises(ValueError, match="bad checksum"):
        _io.atomic_write(p, lambda fh: fh.write(b"new"), verify=reject)
    assert p.read_text() == '{\n "a": 1\n}\n'
    assert [q.name for q in p.parent.iterdir()] == ["f.json"]           # no temporary file left


def test_atomic_savefig_writes_a_png(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    p = _io.atomic_savefig(fig, tmp_path / "f.png", dpi=40)
    plt.close(fig)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alternated_alternates_and_timed_warms_up():
    calls = []
    ta, tb = timing.alternated(lambda: calls.append("a"), lambda: calls.append("b"), rounds=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"] and len(ta) == len(tb) == 4
    n = []
    assert len(timing.timed(lambda: n.append(1), repeats=3, warmup=2)) == 3 and len(n) == 5
    s = timing.stats([3.0, 1.0, 2.0])
    assert s["median"] == 2.0 and s["q25"] <= s["median"] <= s["q75"]
    with pytest.raises(ValueError, match="repeats must be >= 1 and warmup >= 0, got repeats=0"):
        timing.timed(lambda: None, repeats=0)


def test_peak_memory_sees_an_allocation():
    import torch
    peak = timing.peak_memory(lambda: torch.empty(1 << 20, dtype=torch.float32).fill_(1.0))
    assert peak >= 4 * (1 << 20)
