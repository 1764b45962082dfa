"""Steering: every group element acting on a k x k kernel (and on the field axis of its input), the
machinery of the regular G-CNNs (Cohen & Welling 2016) and of E4-Net's steered kernels.

* :func:`steering_matrices`: ``S[g] (k*k, k*k)`` built by acting with :meth:`kit.groups.Group.act_on_image`
  on the one-hot basis kernels, so kernels move exactly as images do (permutations at multiples of
  90 degrees and mirrors, interpolation weights otherwise);
* :func:`steer_kernel`: one learned weight steered to all ``|G|`` output elements, a conv2d filter bank.
"""
from __future__ import annotations

import torch

from ..groups import Group

__all__ = ["steering_matrices", "steer_kernel"]


def steering_matrices(group: Group, kernel_size: int, *, mode: str = "bilinear") -> torch.Tensor:
    """``S[g] (k*k, k*k)`` with ``S[g] @ vec(K) = vec(g . K)`` for every element (float64).

    Built by acting with :meth:`Group.act_on_image` on the one-hot basis kernels, so kernels are
    transformed with exactly the convention images are: permutation matrices for multiples of
    90 degrees and mirrors, interpolation weights otherwise.
    """
    kk = kernel_size * kernel_size
    basis = torch.eye(kk, dtype=torch.float64).reshape(kk, kernel_size, kernel_size)
    return torch.stack([group.act_on_image(basis, g, mode=mode).reshape(kk, kk).T
                        for g in group.elements])                           # (G, kk, kk)


def steer_kernel(weight: torch.Tensor, S: torch.Tensor, rep_in: torch.Tensor | None,
                 perm_in: torch.Tensor | None) -> torch.Tensor:
    """Steer ``weight (O, C, D_in, k, k)`` to all |G| elements -> ``(O*|G|, C*D_in, k, k)``.

    ``S (G, k*k, k*k)`` are the spatial steering matrices; the input field axis is acted on by the
    gather indices ``perm_in (G, D_in)`` when the representation is a permutation, else by the
    matrices ``rep_in (G, D_in, D_in)``.
    """
    O, C, D, k, _ = weight.shape
    G = S.shape[0]
    w = weight.reshape(O, C, D, k * k)                                      # (O, C, D, kk)
    if perm_in is not None:
        w = w[:, :, perm_in]                                                # (O, C, G, D, kk)
    else:
        w = torch.einsum("gde,ocep->ocgdp", rep_in, w)                      # (O, C, G, D, kk)
    w = torch.einsum("gpq,ocgdq->ogcdp", S, w)                              # (O, G, C, D, kk)
    return w.reshape(O * G, C * D, k, k)
