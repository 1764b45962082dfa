"""The conventions of kit/groups.py, decided once and tested here: axioms, direction, element
order, and the homomorphism property of every action for every element pair."""
import itertools
import math

import pytest
import torch

from kit.groups import (Element, act_on_image, cyclic, dihedral, disk_mask, regular_rep, rotate_image,
                        trivial_rep)

GROUPS = [cyclic(1), cyclic(2), cyclic(3), cyclic(4), cyclic(6), cyclic(8), dihedral(1), dihedral(2),
          dihedral(4), dihedral(6), dihedral(8)]


@pytest.mark.parametrize("G", GROUPS, ids=str)
def test_group_axioms(G):
    els, e = G.elements, G.identity
    assert len(els) == G.order == len(set(els))
    for a in els:
        assert G.compose(a, e) == a == G.compose(e, a)
        assert G.compose(a, G.inverse(a)) == e == G.compose(G.inverse(a), a)
    for a, b, c in itertools.product(els, repeat=3):
        assert G.compose(G.compose(a, b), c) == G.compose(a, G.compose(b, c))
    assert [G.index(g) for g in els] == list(range(G.order))


@pytest.mark.parametrize("G", GROUPS, ids=str)
def test_matrix_and_regular_rep_are_homomorphisms(G):
    for a, b in itertools.product(G.elements, repeat=2):
        ab = G.compose(a, b)
        assert torch.allclose(G.matrix(ab), G.matrix(a) @ G.matrix(b), atol=1e-12)
        assert torch.equal(G.regular_matrix(ab), G.regular_matrix(a) @ G.regular_matrix(b))
    # rho(g) e_h = e_{gh}
    for g, h in itertools.product(G.elements, repeat=2):
        e_h = torch.zeros(G.order, dtype=torch.float64)
        e_h[G.index(h)] = 1
        assert (G.regular_matrix(g) @ e_h)[G.index(G.compose(g, h))] == 1


@pytest.mark.parametrize("G", [cyclic(4), dihedral(4), cyclic(8), dihedral(8), cyclic(2), dihedral(2)], ids=str)
def test_exact_image_action_is_homomorphism(G):
    x = torch.randn(2, 3, 9, 11)  # non-square: rot90 swaps H and W, composition must still agree
    exact = [g for g in G.elements if G.is_exact_on_grid(g)]
    for a, b in itertools.product(exact, repeat=2):
        lhs = G.act_on_image(x, G.compose(a, b))
        rhs = G.act_on_image(G.act_on_image(x, b), a)
        assert torch.equal(lhs, rhs), (a, b)


@pytest.mark.parametrize("G", [cyclic(8), dihedral(6), cyclic(3)], ids=str)
def test_interpolated_image_action_is_approximate_homomorphism(G):
    # Smooth blob inside the disk: bilinear resampling composes up to interpolation error only.
    H = 41
    ys, xs = torch.meshgrid(torch.arange(H) - 20.0, torch.arange(H) - 20.0, indexing="ij")
    x = torch.exp(-((xs - 6) ** 2 + (ys + 3) ** 2) / 30.0) + 0.5 * torch.exp(-((xs + 4) ** 2 + ys ** 2) / 12.0)
    m = disk_mask(H, H)
    for a, b in itertools.product(G.elements, repeat=2):
        lhs = G.act_on_image(x, G.compose(a, b))
        rhs = G.act_on_image(G.act_on_image(x, b), a)
        err = ((lhs - rhs)[m].norm() / lhs[m].norm()).item()
        assert err < 0.03, (a, b, err)


def test_rotation_direction_counter_clockwise_as_displayed():
    img = torch.zeros(5, 5)
    img[2, 4] = 1.0                     # a pixel on the positive x axis (right of centre)
    up = rotate_image(img, 90)
    assert up[0, 2] == 1 and up.sum() == 1          # ... moves to the top (positive y), row 0
    assert torch.equal(up, torch.rot90(img, 1, dims=(-2, -1)))
    # the interpolated path agrees with the exact path in direction
    assert torch.allclose(rotate_image(img, 90 - 1e-7), up, atol=1e-5)
    near = rotate_image(img, 89.0, mode="nearest")
    assert near[0, 2] == 1
    # mirror f=1 maps x -> -x (left-right flip of the image)
    assert act_on_image(img, 0, mirror=True)[2, 0] == 1


@pytest.mark.parametrize("G", [dihedral(8), cyclic(6)], ids=str)
def test_image_action_moves_points_by_group_matrix(G):
    # A bright pixel at planar point p lands at (approximately, nearest pixel) g p.
    H = 21
    c = (H - 1) / 2
    p = torch.tensor([6.0, 3.0], dtype=torch.float64)          # (x, y)
    img = torch.zeros(H, H)
    img[int(c - p[1]), int(c + p[0])] = 1.0
    for g in G.elements:
        out = G.act_on_image(img, g, mode="bilinear")
        i, j = divmod(int(out.argmax()), H)
        q = G.matrix(g) @ p
        assert abs((j - c) - q[0]) <= 1.0 and abs((c - i) - q[1]) <= 1.0, (g, (j - c, c - i), q)


def test_angles_and_element_order():
    G = dihedral(4)
    assert [G.index(g) for g in G.elements] == list(range(8))
    assert G.elements[:4] == [Element(k) for k in range(4)]
    assert G.elements[4:] == [Element(k, 1) for k in range(4)]
    assert math.isclose(G.angle(Element(1)), math.pi / 2)
    assert cyclic(8).degrees(Element(3)) == 135.0
    # m r m = r^-1
    m, r = Element(0, 1), Element(1)
    assert G.compose(G.compose(m, r), m) == G.inverse(r)


def test_regular_rep_on_cyclic_group_is_a_roll():
    G = cyclic(6)
    v = torch.arange(6.0, dtype=torch.float64)
    for k in range(6):
        assert torch.equal(G.regular_matrix(Element(k)) @ v, torch.roll(v, k))


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4", True])
def test_bad_group_order(bad):
    with pytest.raises(ValueError, match="group order n must be"):
        cyclic(bad)
    with pytest.raises(ValueError, match="group order n must be"):
        dihedral(bad)


def test_bad_elements():
    with pytest.raises(ValueError, match="not an element of C4"):
        cyclic(4).compose(Element(5), Element(0))
    with pytest.raises(ValueError, match="C4 has no element with mirror"):
        cyclic(4).element(1, 1)


def test_representations_checked():
    assert regular_rep(dihedral(3)).perm is not None
    assert trivial_rep(cyclic(5)).dim == 1
    from kit.groups import Representation
    bad = torch.eye(2, dtype=torch.float64).repeat(4, 1, 1)
    bad[1] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])          # r -> swap, r^2 -> identity?  not a hom.
    with pytest.raises(ValueError, match="not a homomorphism"):
        Representation(cyclic(4), "bad", bad)


# ------------------------------------------------------------------ the one pixel <-> plane convention
def test_plane_coords_x_right_y_up_centred():
    from kit.groups import kernel_offsets, plane_coords
    X, Y = plane_coords(3, 5)
    assert X[0].tolist() == [-2, -1, 0, 1, 2] and Y[:, 0].tolist() == [1, 0, -1]     # row 0 on top
    assert torch.equal(plane_coords(4, 4, spacing=0.5)[0][0], torch.tensor([-0.75, -0.25, 0.25, 0.75],
                                                                            dtype=torch.float64))
    off = kernel_offsets(3)
    assert off[0].tolist() == [-1, 1] and off[2].tolist() == [1, 1] and off[8].tolist() == [1, -1]


def test_rotate_batch_is_act_on_image_per_image():
    """The one batched image action (data and augmentation) is the groups' action, image by image."""
    from kit.groups import act_on_image, rotate_batch
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, 9, 9, generator=g)
    deg = torch.tensor([0.0, 90.0, 180.0, 270.0, 33.0, -127.5])
    y = rotate_batch(x, deg)
    wide = torch.rand(2, 9, 11, generator=g)                          # non-square: 180 exact, 30 sampled
    yw = rotate_batch(wide, [180.0, 30.0])
    assert torch.equal(yw[0], act_on_image(wide[0], 180.0))
    assert torch.allclose(yw[1], act_on_image(wide[1], 30.0), atol=1e-6)
    for i in range(6):
        ref = act_on_image(x[i], float(deg[i]))
        exact = float(deg[i]) % 90 == 0
        assert torch.equal(y[i], ref) if exact else torch.allclose(y[i], ref, atol=1e-6), i
    with pytest.raises(ValueError, match="got 2 angles for 6 images"):
        rotate_batch(x, [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown interpolation mode 'cubic'"):
        rotate_batch(x, deg, mode="cubic")


def test_augmentation_and_data_rotate_with_the_same_action():
    from kit import data
    from kit.run import train
    from kit.groups import rotate_batch
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    got = train.augment(x, "rotate", torch.Generator().manual_seed(5))
    deg = (torch.rand(8, generator=torch.Generator().manual_seed(5)) * 2 - 1) * 180.0
    up = torch.nn.functional.interpolate(x, scale_factor=3, mode="bilinear", align_corners=False)
    want = torch.nn.functional.interpolate(rotate_batch(up, deg, mode="nearest"), size=(28, 28),
                                           mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(got, want)
    imgs = (torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    ang = [10.0, 90.0, 200.0, 45.0, 359.0]
    assert torch.equal(data.rotate_digits(imgs, ang), rotate_batch(imgs.float() / 255, ang).clamp(0, 1))
