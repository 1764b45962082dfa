"""kit.export: every registered model becomes a plain-PyTorch module (eval mode, static kernels baked in
as constants) whose outputs equal the model's plain-PyTorch paths to 1e-6 relative in float32 (and its fused
CPU kernels to 1e-12 in float64), that torch.export produced, and that runs where eqkit cannot even be imported."""
from __future__ import annotations

import collections
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import kit
from kit import models

ALL = models.list_models()


@pytest.mark.parametrize("name", ALL)
def test_export_matches_the_model(name):
    card = models.model_card(name)
    m = models.create_ci(name).eval()
    x = torch.rand(2, *card.input_shape, generator=torch.Generator().manual_seed(1))
    gm = kit.export(m, x)                      # raises above 1e-6 relative from the model's traced (plain) paths
    # the model's fused CPU kernels compute the same function (float32 rounds them otherwise: E4's fused
    # generator is ~1e-6 from the export, as far as every float32 path is from float64): equal in float64
    m64, x64 = copy.deepcopy(m).double(), x.double()
    gm64 = kit.export(m64, x64)
    with torch.no_grad():
        y, ref = gm64(x64), m64(x64)
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-12
    assert "kit" not in gm.code and isinstance(gm.program, torch.export.ExportedProgram)
    assert not m.training                                  # the model itself is left as it was


def test_static_kernels_are_baked_in():
    """p4-mnist's export convolves with constant filter banks: no kernel steering (index / einsum on the
    weights) is left in the graph, only convolutions, batch norm, pooling and the head."""
    m = models.create("p4-mnist").eval()
    gm = kit.export(m)
    ops = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert ops["aten.conv2d.default"] >= 4, ops
    assert not {k for k in ops if "einsum" in k or "index" in k or "gather" in k}, ops


def test_export_runs_without_eqkit(tmp_path):
    """Saved with torch.export.save, the program loads and runs in a process where `import kit` fails."""
    for name in ("p4-mnist", "nepdo-mnist-regular-fd-small"):
        m = models.create(name).eval()
        x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
        gm = kit.export(m, x)
        torch.export.save(gm.program, tmp_path / f"{name}.pt2")
        with torch.no_grad():
            torch.save({"x": x, "y": m(x)}, tmp_path / f"{name}.io.pt")
        script = textwrap.dedent(f"""
            import sys
            sys.modules["kit"] = None                      # eqkit cannot be imported here
            import torch
            io = torch.load({str(tmp_path / f"{name}.io.pt")!r}, weights_only=True)
            prog = torch.export.load({str(tmp_path / f"{name}.pt2")!r})
            y = prog.module()(io["x"])
            err = ((y - io["y"]).norm() / io["y"].norm()).item()
            assert err <= 1e-6, err
            print("ok", err)
        """)
        r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("ok"), (name, r.stdout, r.stderr[-2000:])


def test_export_errors_are_clear():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x
    with pytest.raises(ValueError, match="pass example="):
        kit.export(Plain())
