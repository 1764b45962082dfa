"""One registry of named models (timm style): ``create(name, **overrides)``, ``list_models()``.

Every entry carries a :class:`ModelCard`: the paper it follows, what the paper reported (with the
source of each number), the training recipe, and the input it expects. Builders are keyword-only;
an unknown model name or parameter fails with a message listing the valid ones.
"""
from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["ModelCard", "register_model", "create", "create_ci", "list_models", "model_card", "count_parameters",
           "calibrate_batchnorm"]


@dataclass(frozen=True)
class ModelCard:
    name: str
    builder: Callable[..., nn.Module]
    paper: str
    description: str
    input_shape: tuple = (1, 28, 28)
    num_classes: int = 10
    reported: dict = field(default_factory=dict)   # e.g. {"params": 26747, "test_error": 1.2, "source": "..."}
    recipe: str | None = None                      # name of a kit.run.train preset
    tags: tuple = ()
    invariant: str = "grid"      # logits invariant at: "grid" every grid-exact element, "rotations" its rotations, "none"
    ci: dict = field(default_factory=dict)             # builder overrides for CI-sized builds (tests)
    paper_overrides: dict = field(default_factory=dict)  # overrides under which the parameter count is the paper's

    @property
    def has_weights(self) -> bool:
        """Whether the zoo has trained weights for this model (``create(name, pretrained=True)``)."""
        return self.name in _zoo().list_pretrained()

    @property
    def parameters(self) -> dict:
        """The builder's keyword parameters and their defaults."""
        return {k: p.default for k, p in inspect.signature(self.builder).parameters.items()}


_REGISTRY: dict[str, ModelCard] = {}
INVARIANCE = ("grid", "rotations", "none")


def _ci_size(fn, tags) -> dict:
    """The default CI size of a card: big models (CIFAR ResNets, full-width separable ResNets) at
    about 1/8 of their widths (multiples of 8) and with at most 4 rotations; others as registered."""
    params = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
    ci = {}
    widths = params.get("widths")
    if isinstance(widths, tuple) and ({"cifar", "separable"} & set(tags)) and "small" not in tags:
        ci["widths"] = tuple(max(8, 8 * (w // 64)) for w in widths)
    if isinstance(params.get("rotations"), int) and params["rotations"] > 4:
        ci["rotations"] = 4
    return ci


def register_model(name: str, **card):
    """Decorator: register a keyword-only builder under ``name`` with its :class:`ModelCard` fields."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        bad = [k for k, p in inspect.signature(fn).parameters.items() if p.kind is not p.KEYWORD_ONLY]
        if bad:
            raise TypeError(f"builder of {name!r} must be keyword-only; positional parameters: {bad}")
        if card.get("invariant", "grid") not in INVARIANCE:
            raise ValueError(f"model {name!r}: invariant must be one of {INVARIANCE}, got {card['invariant']!r}")
        card.setdefault("ci", _ci_size(fn, card.get("tags", ())))
        _REGISTRY[name] = ModelCard(name=name, builder=fn, **card)
        return fn

    return deco


def list_models(pattern: str = "*", *, tag: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered model names matching a glob ``pattern`` (and carrying ``tag``; with
    ``pretrained=True`` only those with zoo weights, :mod:`kit.run.zoo`), sorted."""
    have = set(_zoo().list_pretrained()) if pretrained else None
    return sorted(n for n, c in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (tag is None or tag in c.tags) and (have is None or n in have))


def _zoo():
    from ..run import zoo
    return zoo


def model_card(name: str) -> ModelCard:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _REGISTRY[name]


def create(name: str, *, pretrained: bool = False, **overrides) -> nn.Module:
    """Build the named model; ``overrides`` replace the builder's keyword defaults.

    ``pretrained=True`` loads the zoo's weights (:mod:`kit.run.zoo`: sha256-verified, weights-only) and
    returns the model in eval mode, taking the images its dataset delivers (MNIST-rot:
    ``(B, 1, 28, 28)`` in [0, 1]; any input normalisation is inside the model). A name without
    weights, a corrupted file or weights of another architecture raise a clear error."""
    card = model_card(name)
    if pretrained:
        _zoo().manifest(name)                # no weights: the error lists the models that have some
    valid = card.parameters
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for model {name!r}; valid parameters: "
                         f"{', '.join(f'{k}={v!r}' for k, v in valid.items())}")
    model = card.builder(**overrides)
    model.card = card
    if pretrained:
        model = _zoo().load_pretrained(name, model)
    return model


def create_ci(name: str, **overrides) -> nn.Module:
    """The named model at its card's CI size (``card.ci``; what the registry tests build)."""
    return create(name, **{**model_card(name).ci, **overrides})


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256) -> nn.Module:
    """Reset every batch-norm's running statistics to those of the images ``x`` (a cumulative
    average over chunks of ``batch_size``, as ``torch.optim.swa_utils.update_bn``) and return the
    model in eval mode. Everything but the batch norms stays in eval mode while doing so (no
    dropout, no random grid offsets): no random number is drawn.

    An untrained network evaluated with default statistics (mean 0, variance 1) is dominated by its
    biases and barely depends on the input, which makes every invariance measurement look good. A
    calibrated untrained network behaves like a trained one in that respect. The trainer uses the
    same function before every evaluation (``Recipe.bn_recalibration``).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                    # cumulative average over the chunks
        m.train()
    try:
        with torch.no_grad():
            for xb in x.split(batch_size):
                model(xb)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return model.eval()


from . import e4, epdo, mnist, pdo, separable  # noqa: E402,F401  (registers the models)
