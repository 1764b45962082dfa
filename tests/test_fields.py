"""FieldType: layout checks with clear errors, and the field action as a homomorphism."""
import itertools

import pytest
import torch

from kit.fields import FieldType, regular, trivial
from kit.groups import cyclic, dihedral


@pytest.mark.parametrize("G", [cyclic(4), dihedral(4), cyclic(3)], ids=str)
def test_field_transform_is_homomorphism(G):
    t = regular(G, 2)
    x = torch.randn(1, 2, G.order, 7, 7)
    exact = [g for g in G.elements if G.is_exact_on_grid(g)]
    for a, b in itertools.product(exact, repeat=2):
        assert torch.equal(t.transform(x, G.compose(a, b)), t.transform(t.transform(x, b), a))


def test_regular_field_axis_rolls_with_rotation():
    G = cyclic(4)
    t = regular(G, 1, spatial=False)
    v = torch.arange(4.0).reshape(1, 1, 4)
    assert torch.equal(t.transform(v, G.element(1))[0, 0], torch.roll(v[0, 0], 1))


def test_shapes_and_flatten():
    t = regular(dihedral(4), 3)
    x = torch.randn(2, 3, 8, 5, 5)
    assert t.channels == 24 and t.flatten(x).shape == (2, 24, 5, 5)
    assert torch.equal(t.unflatten(t.flatten(x)), x)
    s = trivial(cyclic(4), 10, spatial=False)
    assert s.check(torch.randn(4, 10)).shape == (4, 10)


def test_bad_inputs_name_expected_and_actual():
    t = regular(cyclic(4), 3)
    with pytest.raises(ValueError, match=r"expected a 5-D tensor .* got 4-D"):
        t.check(torch.randn(2, 12, 5, 5))
    with pytest.raises(ValueError, match=r"expected C=3 fields .* got 2"):
        t.check(torch.randn(2, 2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"expected a field axis \(dim 2\) of size D=4 .* got 8"):
        t.check(torch.randn(2, 3, 8, 5, 5))
    with pytest.raises(ValueError, match=r"expected C=1 fields .* got 3"):
        trivial(cyclic(4), 1).check(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="n_fields must be an int >= 1"):
        FieldType(cyclic(4), "regular", 0)
    with pytest.raises(ValueError, match="unknown representation"):
        FieldType(cyclic(4), "irrep", 1)
    with pytest.raises(ValueError, match="expected a torch.Tensor"):
        t.check([1, 2, 3])
