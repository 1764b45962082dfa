"""One training loop for every model and dataset of the kit, with the papers' recipes as presets.

    from kit.run.train import train
    summary = train("p4-mnist", "mnist-rot-rebuilt", preset="mnist-quick", epochs=3, out_dir="runs/x")

What it does, once for everyone:

* **Presets** (:data:`PRESETS`, :func:`get_recipe`): the optimiser, learning-rate schedule, epochs,
  batch, augmentation and normalisation of each paper, with the values of ``../shared/reference``;
  any field can be overridden by keyword (an unknown name fails and lists the valid ones).
* **Metrics**: ``out_dir/run.json`` (what is trained, on what) at the start, one JSON line per
  epoch appended to ``out_dir/metrics.jsonl``; at the end
  ``summary.json`` with the final test accuracy, the test accuracy at the best *validation* epoch,
  and -- labelled as such -- the best test accuracy over epochs, which is what the papers report
  (test-set model selection).
* **Checkpoints**: ``out_dir/checkpoint.pt`` written atomically (temporary file, ``os.replace``)
  after every epoch: model, optimiser, the epoch (the schedule is a pure function of the epoch),
  the metrics so far and every RNG state (torch, CUDA, numpy, python, per rank). The data order and
  the augmentation of epoch ``e`` come from a generator seeded with ``(seed, e)``, so a run killed
  after epoch ``k`` and started again with the same ``out_dir`` ends with exactly the weights and
  metrics of an uninterrupted run (tested).
* **Safety**: a NaN/inf loss stops the run with :class:`NonFiniteLossError` naming the epoch, batch
  and learning rate; resuming from a checkpoint made with other settings is refused.
* **Devices**: ``device="auto"`` picks CUDA when available, else the CPU. Under ``torchrun`` (the
  environment variable ``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on
  GPUs, gloo on CPUs); every global batch is split across the ranks and the loss is scaled so that
  the averaged gradient is that of the global batch. Batch-norm statistics stay per rank (standard
  DDP; ``sync_bn=True`` converts them on GPUs)::

      torchrun --nproc_per_node 2 -m kit.run.train --model p4-mnist --dataset mnist-rot-rebuilt --out runs/ddp
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import data as kdata
from .. import models
from .._compat import require, resolve_device
from .._io import KIT_DIR, atomic_write, atomic_write_json
from ..groups import rotate_batch

__all__ = ["RUN_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "SUMMARY_FILE", "PARAMS_FILE", "ERROR_FILE", "RUN_FILES",
           "Recipe", "PRESETS", "get_recipe", "lr_at", "build_model", "augment", "evaluate", "train",
           "NonFiniteLossError", "read_metrics", "load_checkpoint", "BEST_TEST_LABEL", "curves_figure", "summary_table"]

# The files of a run folder: kit.run.train writes the first four, the sweep runner (kit.run.sweeps) the last two.
RUN_FILE = "run.json"               # what is trained, on what (at the start)
METRICS_FILE = "metrics.jsonl"      # one JSON line per epoch
CHECKPOINT_FILE = "checkpoint.pt"   # model, optimiser, RNG states (after every epoch)
SUMMARY_FILE = "summary.json"       # the final figures (at the end)
PARAMS_FILE = "params.json"         # the sweep's parameters of the run
ERROR_FILE = "error.txt"            # why a sweep run failed
RUN_FILES = (RUN_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE, PARAMS_FILE, ERROR_FILE)

BEST_TEST_LABEL = "best test accuracy over epochs (as the papers report: test-set model selection)"


AUGMENTATIONS = ("none", "rotate", "crop-flip")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# =============================================================================================
# Recipes
# =============================================================================================

@dataclass(frozen=True)
class Recipe:
    """A training recipe. ``schedule``: 'constant'; 'multistep' (multiply by ``gamma`` -- one value,
    or one per milestone -- at each epoch of ``milestones``); 'cosine' (``lr/2 (1 + cos(pi e /
    epochs))``, stepped per epoch); 'piecewise' (``lr_steps`` = ((first epoch, lr), ...)). Epochs
    are counted from 0. ``val``: hold out a validation split (False = train on the whole training
    pool, as the papers do). ``reset_optimizer_each_epoch``: re-create the optimiser (its moments)
    every epoch, as the E4-Net and Neural-ePDO code does. ``lr_per_step``: evaluate the schedule at
    fractional epochs, once per batch (what :func:`scale_recipe` sets, so that a milestone scaled to
    epoch 1.2 falls inside an epoch). ``paper_epochs``: the preset's epochs when the recipe was
    scaled to fewer. ``bn_recalibration``: before every evaluation, recompute each batch norm's
    statistics with the current weights on this many training images (no augmentation, dropout
    off; 0 keeps PyTorch's running averages, as the papers' code does). It changes nothing in
    training, only the statistics eval mode uses: with a few hundred steps per epoch the two agree;
    with a few dozen steps the running averages still carry their initial values (variance 1 against
    ~0.02 in the first layer) and lag weights that move fast, and eval accuracy sits near chance
    while training accuracy rises."""
    name: str
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "constant"
    milestones: tuple = ()
    gamma: float | tuple = 0.1
    lr_steps: tuple = ()
    epochs: int = 10
    batch_size: int = 128
    drop_last: bool = False
    augmentation: str = "none"
    crop_pad: int = 4
    normalise: object = "default"
    val: bool = True
    reset_optimizer_each_epoch: bool = False
    dataset: str = "mnist-rot"
    source: str = ""
    lr_per_step: bool = False
    paper_epochs: int | None = None
    bn_recalibration: int = 2048

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("constant", "multistep", "cosine", "piecewise"):
            raise ValueError(f"schedule must be one of 'constant', 'multistep', 'cosine', 'piecewise', "
                             f"got {self.schedule!r}")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {', '.join(map(repr, AUGMENTATIONS))}, "
                             f"got {self.augmentation!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")


_E4 = "E4-Net (NeurIPS 2021) official code; ../shared/reference/e4net.md section 7"
_PDO = "PDO-eConvs (ICML 2020) official code; ../shared/reference/pdo_econv.md section 6"
_EPDO = "Neural ePDOs (ICLR 2023) official code; ../shared/reference/neural_epdo.md section 8"
_SEP = "Separable G-CNNs (ICML 2022) README recipe; ../shared/reference/separable_gcnn.md section 6"

PRESETS: dict[str, Recipe] = {r.name: r for r in [
    Recipe("mnist-quick", optimizer="adam", lr=2e-3, weight_decay=1e-4, schedule="cosine", epochs=5,
           batch_size=32, dataset="mnist-rot-rebuilt", val=True,
           source="eqkit CPU profile (not a paper's): Adam 2e-3, wd 1e-4, cosine, batch 32, no augmentation"),
    Recipe("e4-mnist-rot", optimizer="adam", lr=0.02, weight_decay=1e-4, schedule="multistep",
           milestones=(60, 120, 160), gamma=0.1, epochs=199, batch_size=128, val=False,
           reset_optimizer_each_epoch=True, normalise="none", dataset="mnist-rot",
           source=f"{_E4}: Adam lr 0.02, wd 1e-4, x0.1 at 60/120/160, range(1, 200) = 199 epochs, batch 128, "
                  f"Adam re-created every epoch, no normalisation, no augmentation, trained on all 12k"),
    Recipe("e4-cifar", optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
           schedule="multistep", milestones=(60, 120, 160), gamma=0.2, epochs=200, batch_size=128,
           val=False, normalise="e4", dataset="cifar10",
           source=f"{_E4}: SGD Nesterov 0.9, lr 0.1, wd 5e-4, x0.2 at 60/120/160, 200 epochs, batch 128, "
                  f"E4 normalisation, no augmentation"),
    Recipe("pdo-econv-mnist", optimizer="adam", lr=1e-3, weight_decay=1e-2, schedule="piecewise",
           lr_steps=((0, 1e-4), (6, 1e-3), (100, 1e-4), (150, 1e-5)), epochs=200, batch_size=128,
           drop_last=True, val=False, normalise="train", dataset="mnist-rot",
           source=f"{_PDO}: Adam, lr 1e-4 (epochs 0-5), 1e-3 (to 99), 1e-4 (to 149), 1e-5 (to 199), "
                  f"200 epochs, batch 128 (last partial batch dropped), L2 1e-2 (as coupled weight decay), "
                  f"train mean/std normalisation, no augmentation"),
    Recipe("pdo-econv-cifar", optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
           schedule="piecewise", lr_steps=((0, 0.1), (150, 0.01), (225, 0.001)), epochs=300, batch_size=128,
           augmentation="crop-flip", crop_pad=4, val=False, normalise="train", dataset="cifar10",
           source=f"{_PDO}: SGD Nesterov 0.9, lr 0.1 / 0.01 from 150 / 0.001 from 225, 300 epochs, "
                  f"batch 128, wd 1e-3, pad-4 random crop + horizontal flip, per-channel normalisation "
                  f"(the code uses train+test statistics; here: train)"),
    Recipe("neural-epdo-mnist-rot", optimizer="adam", lr=2e-3, weight_decay=1e-4, schedule="multistep",
           milestones=(60, 120, 150, 180), gamma=(0.1, 0.5, 0.5, 0.5), epochs=199, batch_size=64,
           augmentation="rotate", val=False, reset_optimizer_each_epoch=True, normalise="none",
           dataset="mnist-rot",
           source=f"{_EPDO}: Adam lr 2e-3, wd 1e-4, x0.1 at 60 then x0.5 at 120/150/180, 199 epochs, "
                  f"batch 64, Adam re-created every epoch, random rotation augmentation (x3 upsample, "
                  f"nearest rotation in [-180, 180], downsample)"),
    Recipe("separable-mnist-rot", optimizer="adam", lr=1e-4, weight_decay=1e-4, schedule="cosine",
           epochs=300, batch_size=64, val=False, normalise=((0.13,), (0.297,)), dataset="mnist-rot",
           source=f"{_SEP}: Adam lr 1e-4, wd 1e-4, cosine (T_max = epochs), 300 epochs, batch 64, "
                  f"mean 0.13 / std 0.297, no augmentation"),
]}


def get_recipe(preset: str | Recipe = "mnist-quick", **overrides) -> Recipe:
    """The named preset with ``overrides`` applied (unknown preset or field names fail and list
    the valid ones)."""
    if isinstance(preset, Recipe):
        base = preset
    elif preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    else:
        base = PRESETS[preset]
    fields = [f.name for f in dataclasses.fields(Recipe) if f.name != "name"]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown recipe field(s) {unknown}; valid fields: {', '.join(fields)}")
    for k in ("milestones", "lr_steps", "gamma"):
        if isinstance(overrides.get(k), list):
            v = overrides[k]
            overrides[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return dataclasses.replace(base, **overrides)


def scale_recipe(recipe: Recipe, epochs: int) -> Recipe:
    """``recipe`` shortened (or lengthened) to ``epochs`` with the same schedule *shape*: milestones
    and piecewise starts scale by ``epochs / recipe.epochs`` (fractional epochs, the schedule is then
    evaluated per batch), cosine spans the new length; every other field (optimiser, lr, batch,
    augmentation, weight decay, optimiser resets per epoch) is kept. ``paper_epochs`` records the
    original length."""
    epochs = int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    f = epochs / recipe.epochs
    sc = lambda e: float(f"{e * f:.6g}")
    return dataclasses.replace(recipe, epochs=epochs, milestones=tuple(sc(m) for m in recipe.milestones),
                               lr_steps=tuple((sc(a), v) for a, v in recipe.lr_steps), lr_per_step=True,
                               paper_epochs=recipe.paper_epochs or recipe.epochs)


def recipe_overrides(recipe) -> dict:
    """The fields of ``recipe`` (a :class:`Recipe` or its dict) that differ from its named preset."""
    r = recipe if isinstance(recipe, dict) else dataclasses.asdict(recipe)
    base = PRESETS.get(r.get("name"))
    if base is None:
        return {}
    b = _jsonable(dataclasses.asdict(base))
    return {k: v for k, v in _jsonable(r).items() if k not in ("name", "source") and b.get(k) != v}


def lr_at(recipe: Recipe, epoch: float) -> float:
    """The learning rate at epoch ``epoch`` (0-based; fractional with ``lr_per_step``): a pure
    function, so resume needs no state."""
    r = recipe
    if r.schedule == "constant":
        return r.lr
    if r.schedule == "cosine":
        return r.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / r.epochs))
    if r.schedule == "multistep":
        gammas = r.gamma if isinstance(r.gamma, tuple) else (r.gamma,) * len(r.milestones)
        lr = r.lr
        for m, g in zip(r.milestones, gammas):
            if epoch >= m:
                lr *= g
        return lr
    lr = r.lr
    for start, value in sorted(r.lr_steps):
        if epoch >= start:
            lr = value
    return lr


# =============================================================================================
# Models, augmentation, evaluation
# =============================================================================================

def build_model(spec, *, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
    """A module from a registry name (see :func:`kit.models.list_models`), a ``'module:callable'``
    path (your own model, called with no arguments), or an ``nn.Module`` (returned as is). For
    registry models, ``num_classes`` / ``in_channels`` are passed when the builder takes them."""
    if isinstance(spec, nn.Module):
        return spec
    if ":" in spec:
        mod, _, attr = spec.partition(":")
        return getattr(_import_user_module(mod, spec), attr)()
    card = models.model_card(spec)      # unknown name -> ValueError listing the valid ones
    kw = {}
    params = card.parameters
    if num_classes is not None and num_classes != card.num_classes:
        if "num_classes" not in params:
            raise ValueError(f"model {spec!r} has {card.num_classes} classes and cannot be built for {num_classes}")
        kw["num_classes"] = num_classes
    if in_channels is not None and in_channels != card.input_shape[0]:
        if "in_channels" not in params:
            raise ValueError(f"model {spec!r} takes {card.input_shape[0]} input channels, the data has {in_channels}")
        kw["in_channels"] = in_channels
    return models.create(spec, **kw)



#: folders searched for a ``'module:callable'`` model after ``sys.path``: ``$KIT_MODEL_PATH`` (a sweep sets it
#: to its spec's folder and the folder it was started from), then the working directory
MODEL_PATH_ENV = "KIT_MODEL_PATH"


def _import_user_module(mod: str, spec: str):
    """``import mod`` from ``sys.path``, else from :data:`MODEL_PATH_ENV`'s folders and the working directory."""
    try:
        return importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name != mod.split(".")[0] and e.name != mod:
            raise                                          # the module exists; something it imports does not
        extra = [d for d in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if d] + [os.getcwd()]
        top = mod.split(".")[0]
        for d in extra:
            if (Path(d) / top).is_dir() or (Path(d) / f"{top}.py").is_file():
                if d not in sys.path:
                    sys.path.insert(0, d)
                return importlib.import_module(mod)
        raise ModuleNotFoundError(f"model {spec!r}: no module {mod!r} on sys.path, in ${MODEL_PATH_ENV} or in the "
                                  f"working directory ({', '.join(extra)}); put {mod.split('.')[0]}.py in one of "
                                  f"them or on PYTHONPATH", name=mod) from None


def load_run(run_dir, *, best_val: bool = False) -> tuple[nn.Module, dict | None]:
    """A trained model back from a run folder (:func:`train` with ``out_dir``, or a sweep's run):
    ``(model in eval mode, summary)``. The checkpoint is loaded with ``weights_only=True``; the model
    is rebuilt from its spec (registry name or ``'module:callable'``, see :func:`build_model`) and
    its state loaded strictly. ``best_val``: the best validation epoch's weights, where kept. The
    summary is ``None`` for a run that has not finished."""
    d = Path(run_dir)
    path = d / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} in {d}: not a run folder of kit.run.train (or it has not "
                                f"finished an epoch yet)")
    ck = load_checkpoint(path)
    spec = ck["config"]["model"]
    if ":" not in spec and spec not in models.list_models():
        raise ValueError(f"the run in {d} trained a module passed as an object ({spec}); build it yourself and "
                         f"load_state_dict(kit.run.train.load_checkpoint(path)['model'])")
    net = build_model(spec)
    state = ck["model"]
    if best_val:
        if not ck.get("best_val"):
            raise ValueError(f"the run in {d} kept no best-validation weights (it had no validation split, or "
                             f"tested every epoch)")
        state = ck["best_val"]["model"]
    net.load_state_dict(state)
    summary = json.loads((d / SUMMARY_FILE).read_text()) if (d / SUMMARY_FILE).is_file() else None
    return net.eval(), summary


def augment(x: torch.Tensor, kind: str, generator: torch.Generator, *, crop_pad: int = 4) -> torch.Tensor:
    """Batch augmentation with an explicit generator (so every epoch's augmentation is reproducible).

    'rotate' (Neural ePDO): upsample x3 (bilinear), rotate each image by a uniform angle in
    [-180, 180] degrees (nearest), downsample back (bilinear, antialiased). 'crop-flip' (CIFAR):
    zero-pad ``crop_pad``, random crop back to the size, horizontal flip with probability 1/2.
    """
    if kind == "none":
        return x
    B, C, H, W = x.shape
    if kind == "rotate":
        up = F.interpolate(x, scale_factor=3, mode="bilinear", align_corners=False)     # (B, C, 3H, 3W)
        degrees = (torch.rand(B, generator=generator) * 2 - 1) * 180.0
        up = rotate_batch(up, degrees, mode="nearest")              # the kit's one batched image action
        return F.interpolate(up, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
    if kind == "crop-flip":
        p = crop_pad
        padded = F.pad(x, (p, p, p, p))
        off = torch.randint(0, 2 * p + 1, (B, 2), generator=generator)
        flip = torch.rand(B, generator=generator) < 0.5
        out = torch.empty_like(x)
        for i in range(B):
            img = padded[i, :, off[i, 0]:off[i, 0] + H, off[i, 1]:off[i, 1] + W]
            out[i] = img.flip(-1) if flip[i] else img
        return out
    raise ValueError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, split, n: int, *, batch_size: int = 256, device="cpu") -> int:
    """Recompute every batch norm's statistics of ``model`` on the first ``n`` rows of ``split``
    with the current weights (:func:`kit.models.calibrate_batchnorm`: dropout and every other
    random part off, no random number drawn). Returns the number of images used (0: no batch norm)."""
    n = min(int(n), len(split))
    if n <= 0 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return 0
    was = model.training
    models.calibrate_batchnorm(model, split.batch(torch.arange(n))[0].to(device), batch_size=batch_size)
    model.train(was)
    return n


@torch.no_grad()
def evaluate(model: nn.Module, split, *, batch_size: int = 500, device="cpu") -> tuple[float, float]:
    """``(mean loss, accuracy in %)`` of ``model`` on a :class:`kit.data.TensorData` split (in eval
    mode; under DDP every rank evaluates its shard and the sums are all-reduced)."""
    rank, world = _dist()
    model.eval()
    idx = torch.arange(len(split)).tensor_split(world)[rank]
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    for b in idx.split(batch_size):
        x, y = split.batch(b)
        x, y = x.to(device), y.to(device)
        out = model(x)
        tot[0] += F.cross_entropy(out, y, reduction="sum").double()
        tot[1] += (out.argmax(1) == y).sum()
        tot[2] += len(b)
    if world > 1:
        torch.distributed.all_reduce(tot)
    n = max(tot[2].item(), 1.0)
    return tot[0].item() / n, 100.0 * tot[1].item() / n


# =============================================================================================
# Checkpoints and metrics files
# =============================================================================================

class _NoBar:
    """The progress bar's interface, silent (``progress=False``: tqdm is not needed)."""

    def __init__(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def _eqkit_commit() -> str | None:
    """The git commit of the kit's source tree (``+uncommitted`` if kit/ has local changes), or None."""
    import subprocess
    here = KIT_DIR
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+uncommitted" if dirty else "")
    except Exception:  # noqa: BLE001 -- no git, no commit
        return None


def _rng_state() -> dict:
    """Every RNG state as tensors and plain numbers, so that a checkpoint loads with
    ``torch.load(..., weights_only=True)`` (no pickled objects, nothing that can run code)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:                                                   # checkpoints of eqkit before the tensor format
        np.random.set_state(n)
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"])
                    if isinstance(p, dict) else p)
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _numpy_safe_globals() -> list:
    """The numpy types of the RNG state of checkpoints written by earlier eqkit versions: array
    reconstruction only (allow-listed for ``weights_only=True``; nothing else is accepted)."""
    import importlib
    out = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):     # numpy 2 / numpy 1 spelling
        try:
            out.append(importlib.import_module(mod)._reconstruct)
        except (ImportError, AttributeError):
            pass
    out += [t for t in (getattr(np.dtypes, "UInt32DType", None),) if t is not None]
    return out


def load_checkpoint(path) -> dict:
    """Load a training checkpoint with ``weights_only=True`` (a checkpoint crafted to run code on load
    is refused with a ``ValueError`` naming the file)."""
    import pickle
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a safe eqkit checkpoint (weights-only load refused it: {first}); "
                         f"delete it or train again into another folder") from None


def read_metrics(out_dir) -> list[dict]:
    """The per-epoch records of ``out_dir/metrics.jsonl`` (empty list if none)."""
    p = Path(out_dir) / METRICS_FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


# =============================================================================================
# The loop
# =============================================================================================

def _summarise(history: list[dict], base: dict) -> dict:
    tested = [h for h in history if h.get("test_acc") is not None]
    last = history[-1]
    s = dict(base)
    s.update(epochs_done=len(history), final_test_acc=last.get("test_acc"), final_test_loss=last.get("test_loss"),
             final_train_loss=last.get("train_loss"), final_val_acc=last.get("val_acc"))
    vals = [h for h in history if h.get("val_acc") is not None]
    if vals:
        best = max(vals, key=lambda h: h["val_acc"])           # first epoch with the best validation acc
        s.update(best_val_acc=best["val_acc"], best_val_epoch=best["epoch"],
                 test_acc_at_best_val=best.get("test_acc"))
    else:
        s.update(best_val_acc=None, best_val_epoch=None, test_acc_at_best_val=None)
    if tested:
        bt = max(tested, key=lambda h: h["test_acc"])
        s.update(best_test_acc_over_epochs=bt["test_acc"], best_test_epoch=bt["epoch"])
    else:
        s.update(best_test_acc_over_epochs=None, best_test_epoch=None)
    s["best_test_acc_over_epochs_label"] = BEST_TEST_LABEL
    s["train_time_s"] = round(sum(h["time_s"] for h in history), 1)
    s["train_cpu_s"] = round(sum(h.get("cpu_s", 0.0) for h in history), 1)
    return s


def train(model="p4-mnist", dataset="mnist-rot-rebuilt", *, preset: str | Recipe | None = None,
          epochs: int | None = None, seed: int = 0, out_dir=None, device: str = "auto",
          train_subset: int | None = None, val_subset: int | None = None, test_subset: int | None = None,
          fraction: float = 1.0, test_every: int = 1, resume: bool = True, progress: bool = True,
          threads: int | None = None, stop_after: int | None = None, callback=None, sync_bn: bool = False,
          scale_schedule: bool = False, log=print, **overrides) -> dict:
    """Train ``model`` on ``dataset`` with a preset recipe; return the summary dict.

    ``model``: registry name, ``'module:callable'`` or module. ``dataset``: a name of
    :data:`kit.data.DATASETS` or a :class:`kit.data.DataBundle`. ``preset``: a name of
    :data:`PRESETS` (default: the model card's recipe, else 'mnist-quick'); ``overrides`` replace
    recipe fields (e.g. ``lr=1e-3``, ``val=False``); ``epochs`` is a shortcut for the field.
    ``out_dir``: where metrics.jsonl, checkpoint.pt and summary.json go (``None``: nothing is
    written and there is no resume). With ``resume`` an existing checkpoint of the same settings is
    continued (a finished run returns its summary at once). ``test_every``: evaluate the test set
    every n epochs (and always at the last). ``stop_after``: stop after that many epochs in total,
    as if killed (the checkpoint is kept; call again to continue). ``callback(epoch, record)`` is
    called after every epoch's checkpoint. ``threads``: ``torch.set_num_threads``.
    ``scale_schedule``: with ``epochs`` fewer (or more) than the preset's, keep the schedule's shape
    (:func:`scale_recipe`: milestones scaled, evaluated per batch) instead of cutting it off.

    With a validation split and a test set evaluated less often than every epoch, the weights of
    the best validation epoch are kept (in the checkpoint too) and tested at the end, so that
    ``test_acc_at_best_val`` is always measured.
    """
    t_start = time.time()
    if threads:
        torch.set_num_threads(int(threads))
    if preset is None:
        card = models.model_card(model) if isinstance(model, str) and ":" not in model else None
        preset = card.recipe if card is not None and card.recipe else "mnist-quick"
        if preset not in PRESETS:
            raise ValueError(f"the card of model {model!r} names recipe {preset!r}, which is not a preset; "
                             f"pass preset=... (valid presets: {', '.join(PRESETS)})")
    if epochs is not None and not scale_schedule:
        overrides["epochs"] = int(epochs)
    recipe = get_recipe(preset, **overrides)
    if scale_schedule and epochs is not None and int(epochs) != recipe.epochs:
        recipe = scale_recipe(recipe, int(epochs))
    if test_every < 1:
        raise ValueError(f"test_every must be >= 1, got {test_every}")

    # --- distributed set-up (torchrun) -----------------------------------------------------------
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device, local_rank=int(os.environ.get("LOCAL_RANK", 0)))   # clear error without CUDA
    use_cuda = device.type == "cuda"
    if world_env > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = _dist()
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # --- data and model --------------------------------------------------------------------------
    if isinstance(dataset, kdata.DataBundle):
        bundle = dataset
    else:
        bundle = kdata.load_dataset(dataset, val=recipe.val, train_subset=train_subset, val_subset=val_subset,
                                    test_subset=test_subset, fraction=fraction, normalise=recipe.normalise)
    info = bundle.info
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    net = build_model(model, num_classes=info.get("num_classes"), in_channels=info["input_shape"][0]).to(device)
    n_params = models.count_parameters(net)
    if world > 1:
        torch.manual_seed(seed * 1000 + rank)       # per-rank dropout streams
        if sync_bn and device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = net

    def make_optimizer():
        if recipe.optimizer == "adam":
            return torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        return torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)

    opt = make_optimizer()
    config = dict(model=model if isinstance(model, str) else type(model).__name__, dataset=info["name"],
                  recipe=_jsonable({k: v for k, v in dataclasses.asdict(recipe).items() if k != "source"}), seed=seed,
                  sizes=info["sizes"], test_every=test_every, world_size=world)
    base = dict(model=config["model"], dataset=info["name"], dataset_label=info["label"],
                rebuilt=bool(info.get("rebuilt")), preset=recipe.name, epochs=recipe.epochs, seed=seed,
                train_size=info["sizes"]["train"], val_size=info["sizes"]["val"], test_size=info["sizes"]["test"],
                fraction=fraction, params=n_params, device=str(device), world_size=world,
                recipe_overrides=recipe_overrides(recipe), recipe_source=recipe.source,
                eqkit_commit=_eqkit_commit(), torch=torch.__version__,
                input_mean=None if bundle.train.mean is None else bundle.train.mean.flatten().tolist(),
                input_std=None if bundle.train.std is None else bundle.train.std.flatten().tolist())

    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT_FILE if out else None
    history: list[dict] = []
    start = 0
    best_val_state = None           # (epoch, val acc, state dict): tested at the end if never tested
    if out and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_FILE, base)
    if out and resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        ck["config"].get("recipe", {}).pop("source", None)      # documentation, not a setting
        if ck["config"] != _jsonable(config):
            diff = {k: (ck["config"].get(k), v) for k, v in _jsonable(config).items() if ck["config"].get(k) != v}
            raise ValueError(f"{ckpt_path} was written with other settings {diff} (checkpoint, now); "
                             f"use another out_dir or resume=False")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        history = ck["history"]
        start = ck["epoch"]
        best_val_state = ck.get("best_val")
        _set_rng_state(ck["rng"][rank])
        if rank == 0:   # metrics.jsonl = exactly the checkpoint's history (drops a line written after it)
            atomic_write(out / METRICS_FILE,
                          lambda fh: fh.write("".join(json.dumps(h) + "\n" for h in history).encode()))
        if start >= recipe.epochs and (out / SUMMARY_FILE).is_file():
            return json.loads((out / SUMMARY_FILE).read_text())
        if start < recipe.epochs:       # (a finished run without summary goes on to write it)
            log(f"resuming {out} after epoch {start}/{recipe.epochs}")
    elif out and rank == 0 and not resume:
        for name in (METRICS_FILE, SUMMARY_FILE, CHECKPOINT_FILE):
            (out / name).unlink(missing_ok=True)

    # --- epochs ----------------------------------------------------------------------------------
    tqdm = require("tqdm", "run", feature="the training progress bar (progress=True)").tqdm if progress else _NoBar

    N, B = len(bundle.train), recipe.batch_size
    n_batches = N // B if recipe.drop_last else math.ceil(N / B)
    if n_batches == 0:
        raise ValueError(f"the training split has {N} rows, fewer than one batch of {B} (drop_last)")
    last_epoch = recipe.epochs if stop_after is None else min(recipe.epochs, int(stop_after))
    for epoch in range(start, last_epoch):
        t0, c0 = time.time(), time.process_time()
        if recipe.reset_optimizer_each_epoch:
            opt = make_optimizer()
        lr = lr_at(recipe, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
        perm = torch.randperm(N, generator=gen)
        ddp.train()
        tot = torch.zeros(3, dtype=torch.float64, device=device)   # loss sum, correct, count
        bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not progress or rank != 0,
                   leave=False, mininterval=10.0, file=sys.stderr)
        for b in range(n_batches):
            if recipe.lr_per_step:
                for g in opt.param_groups:
                    g["lr"] = lr_at(recipe, epoch + b / n_batches)
            gidx = perm[b * B:(b + 1) * B]
            x, y = bundle.train.batch(gidx)
            x = augment(x, recipe.augmentation, gen, crop_pad=recipe.crop_pad)   # the whole global batch
            x, y = x.tensor_split(world)[rank].to(device), y.tensor_split(world)[rank].to(device)
            logits = ddp(x)
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
            loss = loss_sum * (world / len(gidx))          # DDP averages: the global-batch mean gradient
            step = torch.stack([loss_sum.detach().double(), (logits.argmax(1) == y).sum().double(),
                                torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
            if world > 1:
                torch.distributed.all_reduce(step)
            if not math.isfinite(step[0].item()):
                bar.close()
                where = f"; the last good checkpoint is {ckpt_path} (epoch {epoch})" if ckpt_path else ""
                raise NonFiniteLossError(
                    f"training stopped: the loss is {step[0].item()} at epoch {epoch + 1}, batch {b + 1}/{n_batches} "
                    f"(lr {lr:g}, preset {recipe.name!r}). Lower the learning rate (lr=...) or check the "
                    f"inputs for NaN/inf{where}.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += step
            bar.update(1)
            if b % 10 == 0:
                bar.set_postfix(loss=f"{tot[0].item() / tot[2].item():.3f}")
        bar.close()
        rec = dict(epoch=epoch + 1, lr=float(f"{lr:.12g}"), train_loss=tot[0].item() / tot[2].item(),
                   train_acc=100.0 * tot[1].item() / tot[2].item())
        if recipe.bn_recalibration:
            recalibrate_batchnorm(net, bundle.train, recipe.bn_recalibration, device=device)
        tested = (epoch + 1) % test_every == 0 or epoch + 1 == recipe.epochs
        if bundle.val is not None and len(bundle.val):
            rec["val_loss"], rec["val_acc"] = evaluate(net, bundle.val, device=device)
            if not tested and (best_val_state is None or rec["val_acc"] > best_val_state["val_acc"]):
                best_val_state = dict(epoch=epoch + 1, val_acc=rec["val_acc"],
                                      model={k: v.detach().clone() for k, v in net.state_dict().items()})
            elif tested and (best_val_state is None or rec["val_acc"] > best_val_state["val_acc"]):
                best_val_state = dict(epoch=epoch + 1, val_acc=rec["val_acc"], model=None)   # tested now
        if tested:
            rec["test_loss"], rec["test_acc"] = evaluate(net, bundle.test, device=device)
        rec["time_s"] = round(time.time() - t0, 3)                 # wall clock
        rec["cpu_s"] = round(time.process_time() - c0, 3)          # CPU time of this process (all threads)
        history.append(rec)
        rngs = [_rng_state()]
        if world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, _rng_state())
        if out and rank == 0:
            state = dict(model=net.state_dict(), optimizer=opt.state_dict(), epoch=epoch + 1, history=history,
                         rng=rngs, config=_jsonable(config), best_val=best_val_state)
            atomic_write(ckpt_path, lambda fh: torch.save(state, fh))
            with open(out / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        msg = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items())
        if rank == 0:
            log(msg)
        if callback is not None:
            callback(epoch + 1, rec)

    summary = _summarise(history, base)
    summary["finished"] = len(history) >= recipe.epochs
    if summary["finished"] and best_val_state is not None and best_val_state.get("model") is not None \
            and summary.get("test_acc_at_best_val") is None:
        # the best validation epoch was not a test epoch: test its weights now (then restore the last)
        last = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(best_val_state["model"])
        summary["test_loss_at_best_val"], summary["test_acc_at_best_val"] = evaluate(net, bundle.test, device=device)
        net.load_state_dict(last)
    summary["wall_time_s"] = round(time.time() - t_start, 1)
    if out and rank == 0 and summary["finished"]:
        atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def curves_figure(history, *, title: str | None = None):
    """Matplotlib figure of a run's curves (loss and accuracy per epoch; train / val / test).
    ``history``: the records of :func:`read_metrics` or an output folder."""
    import matplotlib
    import matplotlib.pyplot as plt
    if not isinstance(history, list):
        history = read_metrics(history)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
        pts = [(h["epoch"], h[f"{split}_loss"], h[f"{split}_acc"]) for h in history
               if h.get(f"{split}_acc") is not None]
        if pts:
            e, lo, ac = zip(*pts)
            a1.plot(e, lo, style, marker="o", label=split)
            a2.plot(e, ac, style, marker="o", label=split)
    a1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if title:                   # wrapped: a long title (the bundled sample's dataset label) must not widen the
        import textwrap         # saved figure, which would shrink every label at notebook width
        fig.suptitle("\n".join(textwrap.wrap(title, 80)))
    fig.tight_layout()
    return fig


def summary_table(summary: dict) -> str:
    """A short markdown table of a summary (the three test accuracies, labelled)."""
    def f(v, suffix=""):
        return "—" if v is None else (f"{v:.2f}{suffix}" if isinstance(v, float) else f"{v}{suffix}")
    rows = [("model", summary["model"]), ("dataset", summary["dataset_label"]), ("preset", summary["preset"]),
            ("epochs", f"{summary['epochs_done']} / {summary['epochs']}"),
            ("train / val / test size", f"{summary['train_size']} / {summary['val_size']} / {summary['test_size']}"),
            ("parameters", f"{summary['params']:,}"),
            ("final test accuracy", f(summary["final_test_acc"], " %")),
            ("test accuracy at the best validation epoch",
             f(summary["test_acc_at_best_val"], " %")
             + (f" (epoch {summary['best_val_epoch']})" if summary.get("best_val_epoch") else " (no val split)")),
            (BEST_TEST_LABEL, f(summary["best_test_acc_over_epochs"], " %")),
            ("training time", f"{summary['train_time_s']:.0f} s on {summary['device']}")]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


# =============================================================================================
# Command line (also the torchrun entry point)
# =============================================================================================

def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kit.run.train", description="Train one model (torchrun-ready).")
    ap.add_argument("--model", default="p4-mnist", help="registry name or module:callable")
    ap.add_argument("--dataset", default="mnist-rot-rebuilt", help=f"auto or one of {', '.join(kdata.DATASETS)}")
    ap.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: the model card's)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (metrics.jsonl, checkpoint.pt, summary.json)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--val-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--test-every", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a recipe field, e.g. --set lr=0.001 --set val=false")
    a = ap.parse_args(argv)
    overrides = {}
    for item in a.set:
        k, sep, v = item.partition("=")
        if not sep:
            ap.error(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[k] = _parse_value(v)
    s = train(a.model, a.dataset, preset=a.preset, epochs=a.epochs, seed=a.seed, out_dir=a.out, device=a.device,
              train_subset=a.train_subset, val_subset=a.val_subset, test_subset=a.test_subset,
              test_every=a.test_every, threads=a.threads, progress=not a.no_progress, **overrides)
    rank, _ = _dist()
    if rank == 0:
        print(json.dumps(s, indent=1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank reaches this point before the group is torn down: a rank that destroys its gloo
        # context while another is still in a collective aborts ("terminate called without an active
        # exception", seen once under CI load)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
