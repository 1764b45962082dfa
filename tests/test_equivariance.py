"""The instrument itself: records, error vs angle with its interpolation floor, clear errors."""
import math

import pytest
import torch
import torch.nn as nn

from kit import models
from kit.equivariance import check, default_input, error_vs_angle, max_error, records_table
from kit.fields import trivial
from kit.groups import cyclic
from kit.layers import LiftingConv


def test_error_vs_angle_p4_at_45_separates_layer_and_floor(digits):
    m = models.calibrate_batchnorm(models.create("p4-mnist"), digits[:128])
    recs = error_vs_angle(m, [0, 45, 90, 180], x=digits[128:132])
    r = {rec.angle: rec for rec in recs}
    assert r[0].error == 0 and r[0].floor == 0
    assert r[90].element is not None and r[90].error <= 1e-5 and r[90].floor == 0
    assert r[45].element is None
    assert 1e-4 < r[45].error < 1 and 1e-4 < r[45].floor < 1       # both measured, separately
    assert r[45].floor < r[45].error          # p4 is not built for 45 degrees: above its floor
    assert "floor" in records_table(recs)


def test_error_vs_angle_spatial_output_floor_is_round_trip(digits):
    lift = LiftingConv(group=cyclic(4), in_channels=1, out_fields=3, kernel_size=5)
    recs = error_vs_angle(lift, [30, 90], x=digits[:2])
    assert recs[1].error <= 1e-5 and recs[1].floor == 0
    assert recs[0].floor > 0 and recs[0].error > 0


def test_identity_map_error_equals_its_floor(digits):
    class Identity(nn.Module):
        in_type = out_type = trivial(cyclic(4), 1)

        def forward(self, x):
            return x
    recs = error_vs_angle(Identity(), [20, 45, 70], x=digits[:2])
    for r in recs:
        assert math.isclose(r.error, r.floor, rel_tol=1e-6)


def test_default_input_is_real_digits():
    x = default_input(trivial(cyclic(4), 1))
    assert x.shape == (2, 1, 28, 28) and x.min() >= 0 and x.max() <= 1 and x.std() > 0.1


def test_check_restores_training_mode(digits):
    m = models.create("p4-mnist").train()
    check(m, x=digits[:2])
    assert m.training


def test_instrument_errors_are_clear(digits):
    with pytest.raises(ValueError, match="has no in_type/out_type"):
        check(nn.Conv2d(1, 1, 3), x=digits[:1])
    gc_like = LiftingConv(group=cyclic(4), in_channels=1, out_fields=2)
    with pytest.raises(ValueError, match=r"expected C=1 fields"):
        check(gc_like, x=torch.rand(1, 2, 28, 28))
    from kit.layers import GroupConv
    with pytest.raises(ValueError, match="error_vs_angle needs a module that takes images"):
        error_vs_angle(GroupConv(group=cyclic(4), in_fields=1, out_fields=1), [45])
    with pytest.raises(ValueError, match="mirror=True needs a dihedral group"):
        error_vs_angle(gc_like, [45], x=digits[:1], mirror=True)


def test_dihedral_mirrors_in_error_vs_angle(digits):
    m = models.calibrate_batchnorm(models.create("p4m-mnist"), digits[:128])
    recs = error_vs_angle(m, [0, 90, 45], x=digits[128:130], mirror=True)
    assert recs[0].element.f == 1 and recs[0].error <= 1e-5
    assert recs[1].error <= 1e-5
    assert max_error(recs[:2]) <= 1e-5 < recs[2].error
