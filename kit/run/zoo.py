"""The trained zoo: weights produced by the kit's own sweep, behind ``kit.models.create(name,
pretrained=True)`` (timm's convention).

    m = kit.models.create("p4-mnist", pretrained=True)      # eval mode, takes (B, 1, 28, 28) in [0, 1]
    kit.models.list_models(pretrained=True)                 # the names that have weights

What it is: for every zoo model, ``kit/weights/<name>.pt`` (a float32 state dict, loaded with
``torch.load(..., weights_only=True)`` after its sha256 was checked against the manifest) and
``kit/weights/<name>.json``, the manifest: builder overrides, the recipe with every scaled value,
data and split, epochs, the final and best-validation-epoch test accuracies, the accuracy on the
fixed held-out subset (:func:`heldout`: 2,000 digits of the rebuilt test split, bundled, so a clone
can check a checkpoint against its manifest without any data folder), the paper's number (labelled:
best test accuracy over epochs, the papers' test-set selection), seed, wall time, machine, torch
version, eqkit commit and the file's sha256.

What it is not: the papers' checkpoints (nothing fetched from elsewhere is stored here), nor the
papers' protocol: the zoo trains on *rebuilt* MNIST-rot with each card's recipe scaled to a CPU
budget (``sweeps/zoo.yaml``). Rebuild everything with ``make zoo``; re-export finished runs with
``python -m kit zoo export``.

A model trained on standardised inputs (the PDO-eConv and separable recipes) is returned inside
:class:`Standardized`, so the caller always passes the images its dataset delivers.
"""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .._io import KIT_DIR, atomic_write, atomic_write_json, atomic_write_text, file_digest, name_matches
from .train import CHECKPOINT_FILE, PARAMS_FILE, SUMMARY_FILE
from ..data import _atomic_savez as _savez
from ..layers.base import EquivariantModule

__all__ = ["WEIGHTS_DIR", "HELDOUT_SIZE", "Standardized", "list_pretrained", "manifest", "weights_path",
           "describe_weights",
           "load_pretrained", "initial_twin", "heldout", "heldout_accuracy", "build_heldout", "export_run", "export_sweep",
           "zoo_rows", "zoo_markdown", "sha256"]

PKG = KIT_DIR
WEIGHTS_DIR = PKG / "weights"
HELDOUT_FILE = PKG / "assets" / "mnist_rot_heldout.npz"
HELDOUT_SIZE = 2000
REBUILD = "`make zoo` (retrains: python -m kit sweep sweeps/zoo.yaml), then `python -m kit zoo export`"
BEST_TEST = "best test accuracy over epochs (as the papers report: test-set model selection)"


# ----------------------------------------------------------------------------------- files
def sha256(path) -> str:
    """Hex SHA-256 of a file (what the manifests record)."""
    return file_digest(path, "sha256")


def weights_path(name: str, root=None) -> Path:
    return Path(root or WEIGHTS_DIR) / f"{name}.pt"


def _manifest_path(name: str, root=None) -> Path:
    return Path(root or WEIGHTS_DIR) / f"{name}.json"


def list_pretrained(root=None) -> list[str]:
    """Names that have a manifest in the weights folder, sorted."""
    d = Path(root or WEIGHTS_DIR)
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def manifest(name: str, root=None) -> dict:
    """The manifest of zoo model ``name`` (a clear error if it has none)."""
    p = _manifest_path(name, root)
    if not p.is_file():
        have = ", ".join(list_pretrained(root)) or "none"
        raise ValueError(f"model {name!r} has no pretrained weights (no {p}); models with weights: {have}. "
                         f"Train and export it with {REBUILD}")
    return json.loads(p.read_text())


# ------------------------------------------------------------------------- preprocessing
class Standardized(EquivariantModule):
    """``net((x - mean) / std)``: the per-channel input normalisation a zoo model was trained with,
    carried by the model so that callers pass raw images (MNIST-rot: ``(B, 1, 28, 28)`` in [0, 1]).

    A per-channel affine map of a trivial field commutes with every rotation and mirror, so the
    wrapper keeps the network's equivariance; ``in_type`` / ``out_type`` are the network's. Any other
    attribute is the network's (``m.layers``, ``m.features``...); those internals expect
    standardised inputs: use :meth:`preprocess` first.
    """

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.in_type, self.out_type = net.in_type, net.out_type
        c = net.in_type.channels
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(c, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(c, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)               # (B, C, H, W)

    def _forward(self, x):
        return self.net(self.preprocess(x))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["net"], name)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Preprocess(nn.Module):
    """The input standardisation of a :class:`Standardized` model as a module of its own (a stem
    for explorers that run a network's first layers)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.preprocess(x)


# ------------------------------------------------------------------------------ loading
def describe_weights(name: str, *, pretrained: bool, arch: str = "") -> str:
    """One line for an explorer's title: which model (``arch`` in brackets if given) and which weights:
    the zoo manifest's recipe and accuracies for a trained one, "untrained (seeded)" otherwise."""
    head = f"{name} ({arch})" if arch else name
    if not pretrained:
        return f"{head}: untrained (seeded), batch norm calibrated on real digits"
    m = manifest(name)
    return (f"{head}: trained by the zoo ({m['epochs']} epochs of the {m['preset']} recipe scaled, "
            f"{m.get('dataset_label', m['dataset'])}); test accuracy {m['final_test_acc']:.2f} % (final), "
            f"{m['test_acc_at_best_val']:.2f} % (best-val epoch); initial twin: seed {m['seed']}, "
            f"batch norm calibrated on real digits")


def load_pretrained(name: str, model: nn.Module, root=None) -> nn.Module:
    """Load zoo weights into ``model`` (built by ``kit.models.create(name)``): sha256 checked against
    the manifest, ``weights_only=True``, strict keys and shapes. Returns the model in eval mode,
    inside :class:`Standardized` when the recipe normalised its inputs. Nothing is written."""
    man = manifest(name, root)
    path = weights_path(name, root)
    if not path.is_file():
        raise FileNotFoundError(f"the weights file {path} of {name!r} is missing (its manifest is there); "
                                f"rebuild it with {REBUILD}")
    digest = sha256(path)
    if digest != man["sha256"]:
        raise ValueError(f"{path} is corrupted or was replaced: sha256 {digest[:16]}... but its manifest says "
                         f"{man['sha256'][:16]}...; restore it (git checkout -- {path.name}) or rebuild it with "
                         f"{REBUILD}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a readable message for any unreadable file
        raise ValueError(f"{path} cannot be read as a weights-only state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); rebuild it with {REBUILD}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; rebuild it with {REBUILD}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:4]
        raise ValueError(f"{path} holds the weights of another architecture than this {name!r} "
                         f"(built with {man.get('builder_overrides') or 'its defaults'} in the zoo): "
                         f"{' '.join(lines)[:400]}") from None
    norm = man.get("input_normalisation")
    if norm:
        card = getattr(model, "card", None)
        model = Standardized(model, norm["mean"], norm["std"])
        model.card = card
    model.pretrained = dict(name=name, file=str(path), sha256=digest, manifest=man)
    return model.eval()


def initial_twin(name: str, *, calibrate: torch.Tensor | None = None, root=None) -> nn.Module:
    """The untrained twin of zoo model ``name``: exactly the weights its training run started from
    (``kit.run.train.train`` seeds torch, numpy and random with the run's seed right before building
    the model), with the same input normalisation, in eval mode. ``calibrate``: a batch of images
    in [0, 1] to set its batch-norm statistics (an untrained net with the default statistics barely
    depends on its input; see :func:`kit.models.calibrate_batchnorm`)."""
    import random

    from .. import models
    man = manifest(name, root)
    seed = int(man["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    net = models.create(name, **(man.get("builder_overrides") or {}))
    norm = man.get("input_normalisation")
    model = Standardized(net, norm["mean"], norm["std"]) if norm else net
    model.card = net.card
    if calibrate is not None:
        models.calibrate_batchnorm(model, calibrate)
    return model.eval()


# ------------------------------------------------------------------------ held-out subset
def build_heldout(root=None, out=HELDOUT_FILE) -> Path:
    """Write the held-out subset: the first :data:`HELDOUT_SIZE` digits of the rebuilt MNIST-rot
    *test* split (never trained on), uint8 ``round(255 x)``, with their labels and angles. Needs
    the raw MNIST files (``kit.data.mnist_root``); deterministic."""
    from .. import data as kdata
    d = kdata.mnist_rot_rebuilt("test", HELDOUT_SIZE, root=root)
    imgs = np.clip(np.rint(np.asarray(d["images"]) * 255.0), 0, 255).astype(np.uint8)
    return _savez(Path(out), images=imgs, labels=np.asarray(d["labels"], np.uint8),
                               angles=np.asarray(d["angles_deg"], np.float32),
                               source_index=np.asarray(d["source_index"], np.int32))


def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled held-out subset: ``(images (2000, 1, 28, 28) float32 in [0, 1], labels (2000,))``."""
    if not HELDOUT_FILE.is_file():
        raise FileNotFoundError(f"the held-out subset {HELDOUT_FILE} is missing; rebuild it with "
                                f"`python -m kit zoo heldout` (needs raw MNIST)")
    with np.load(HELDOUT_FILE, allow_pickle=False) as z:
        x = torch.from_numpy(z["images"].astype(np.float32) / 255.0)[:, None]
        y = torch.from_numpy(z["labels"].astype(np.int64))
    return x, y


@torch.no_grad()
def heldout_accuracy(model: nn.Module, *, batch: int = 500) -> float:
    """Accuracy (%) of ``model`` (eval mode) on :func:`heldout`."""
    x, y = heldout()
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch)))
    return 100.0 * correct / len(y)


# ------------------------------------------------------------------------------- export
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PKG, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def _paper(card) -> dict:
    rep = card.reported or {}
    name = card.name
    ref = rep.get("paper_model")
    if ref is None and name.endswith("-small"):
        ref = name[: -len("-small")]
    acc = rep.get("accuracy") or (round(100 - rep["test_error"], 4) if rep.get("test_error") is not None else None)
    of = name
    if acc is None and ref:
        from .. import models
        try:
            r2 = models.model_card(ref).reported or {}
        except ValueError:
            r2 = {}
        acc = r2.get("accuracy") or (round(100 - r2["test_error"], 4) if r2.get("test_error") is not None else None)
        of = ref if acc is not None else name
    return dict(accuracy=acc, of=of, metric=BEST_TEST if acc is not None else None,
                dataset="official MNIST-rot (12k train / 50k test), full recipe" if acc is not None else None,
                source=rep.get("source", "") if of == name else f"card of {of}")


def export_run(run_dir, *, out_dir=None, log=print) -> dict:
    """Export one finished zoo run (``runs/zoo/<model>``) into the weights folder: the float32 state
    dict and its manifest, both written atomically; the held-out accuracy is measured on the file
    just written, loaded back through :func:`load_pretrained`."""
    from .. import models
    from ..measure.complexity import count_macs
    from .train import load_checkpoint

    d = Path(run_dir)
    if not (d / SUMMARY_FILE).is_file():
        raise ValueError(f"{d} is not a finished run (no summary.json)")
    summ = json.loads((d / SUMMARY_FILE).read_text())
    params = json.loads((d / PARAMS_FILE).read_text()) if (d / PARAMS_FILE).is_file() else {}
    ck = load_checkpoint(d / CHECKPOINT_FILE)
    name = summ["model"]
    card = models.model_card(name)
    overrides = params.get("MODEL_OVERRIDES") or {}
    net = models.create(name, **overrides)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in ck["model"].items()}
    net.load_state_dict(state)                              # the architecture of the card, checked
    out = Path(out_dir or WEIGHTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    pt = weights_path(name, out)
    atomic_write(pt, lambda fh: torch.save(state, fh))
    size = pt.stat().st_size
    recipe = ck["config"]["recipe"]
    man = dict(
        model=name, builder_overrides=overrides, family=_family(card), paper=card.paper,
        file=pt.name, sha256=sha256(pt), bytes=size, dtype="float32",
        params=models.count_parameters(net),
        macs_per_image=int(count_macs(models.create(name, **overrides), card.input_shape).macs),
        preset=summ["preset"], recipe=recipe, recipe_overrides=summ.get("recipe_overrides", {}),
        recipe_source=summ.get("recipe_source", ""),
        scaled=dict(epochs=recipe["epochs"], paper_epochs=recipe.get("paper_epochs") or recipe["epochs"],
                    milestones=recipe.get("milestones"), lr_steps=recipe.get("lr_steps"),
                    schedule=recipe.get("schedule"), lr_per_step=recipe.get("lr_per_step")),
        dataset=summ["dataset"], dataset_label=summ["dataset_label"], rebuilt=summ.get("rebuilt"),
        split=dict(train=summ["train_size"], val=summ["val_size"], test=summ["test_size"]),
        input_normalisation=(dict(mean=summ["input_mean"], std=summ["input_std"])
                             if summ.get("input_mean") is not None else None),
        epochs=summ["epochs_done"], final_test_acc=summ["final_test_acc"],
        test_acc_at_best_val=summ["test_acc_at_best_val"], best_val_epoch=summ["best_val_epoch"],
        best_val_acc=summ.get("best_val_acc"), final_val_acc=summ.get("final_val_acc"),
        paper_number=_paper(card),
        seed=summ["seed"], wall_time_s=summ.get("wall_time_s"), train_time_s=summ.get("train_time_s"),
        train_cpu_s=summ.get("train_cpu_s"), threads=params.get("THREADS"),
        machine=dict(platform=platform.platform(), processor=platform.machine(), cpus=_cpus(),
                     device=summ.get("device")),
        torch=torch.__version__, eqkit_commit=summ.get("eqkit_commit") or _git_commit(),
        eqkit_commit_note=None if summ.get("eqkit_commit") else "HEAD at export (the run did not record one)",
        history=ck["history"], summary=summ,
    )
    mp = _manifest_path(name, out)
    atomic_write_json(mp, man)
    model = load_pretrained(name, models.create(name, **overrides), root=out)
    man["heldout"] = dict(file=f"kit/assets/{HELDOUT_FILE.name}", n=HELDOUT_SIZE, accuracy=heldout_accuracy(model),
                          note="first 2,000 digits of the rebuilt test split (uint8), recomputed by the tests")
    atomic_write_json(mp, man)
    log(f"  {name}: {size / 1e6:.2f} MB, test {man['final_test_acc']:.2f} % (final), "
        f"{man['test_acc_at_best_val']:.2f} % (best val, epoch {man['best_val_epoch']}), "
        f"held-out {man['heldout']['accuracy']:.2f} % -> {pt}")
    return man


def _cpus():
    import os
    return os.cpu_count()


def _family(card) -> str:
    """The family prefix of a zoo name: cnn, p4, p4m, e4, pdo, nepdo, sep-se2, dsep-se2, sep-sim2..."""
    return card.name.split("-mnist")[0]


def export_sweep(sweep_dir=None, *, only: str = "*", out_dir=None, log=print) -> list[dict]:
    """Export every finished run of the zoo sweep (``runs/zoo`` by default)."""
    from .sweeps import REPO
    sd = Path(sweep_dir or REPO / "runs" / "zoo")
    if not sd.is_dir():
        raise FileNotFoundError(f"no zoo runs in {sd}; train them first: python -m kit sweep sweeps/zoo.yaml")
    done = [p for p in sorted(sd.iterdir()) if (p / SUMMARY_FILE).is_file() and name_matches(p.name, only)]
    if not done:
        raise ValueError(f"no finished run in {sd} (matching {only!r}); see python -m kit sweep sweeps/zoo.yaml --dry-run")
    return [export_run(p, out_dir=out_dir, log=log) for p in done]


# -------------------------------------------------------------------------------- table
def zoo_rows(root=None) -> list[dict]:
    return [manifest(n, root) for n in list_pretrained(root)]


def _f(v, nd=2, suffix=""):
    return "—" if v is None else f"{v:.{nd}f}{suffix}"


def zoo_markdown(rows=None, *, short: bool = False) -> str:
    """The zoo table: parameters, MACs, epochs trained / paper epochs, test accuracy (final and at
    the best-validation epoch), the paper's number (labelled) and the gap, data and recipe labels."""
    rows = zoo_rows() if rows is None else rows
    if not rows:
        return f"No zoo weights yet: {REBUILD}."
    head = ["model", "family", "params", "MACs / image", "epochs / preset", "test % final",
            "test % at best val (epoch)", "paper % †", "gap (paper − best val)", "data, recipe"]
    if short:
        head = ["model", "params", "epochs / preset", "test % final", "test % at best val", "paper % †", "gap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in rows:
        p = m["paper_number"]
        pa = p.get("accuracy")
        pa_s = "—" if pa is None else (f"{pa:.2f}" + ("" if p["of"] == m["model"] else f" ({p['of']})"))
        gap = None if pa is None or m["test_acc_at_best_val"] is None else pa - m["test_acc_at_best_val"]
        ep = f"{m['epochs']} / {m['scaled']['paper_epochs']}"
        label = ("rebuilt" if m.get("rebuilt") else m["dataset"]) + f", {m['preset']} scaled {ep}"
        bv = f"{_f(m['test_acc_at_best_val'])} ({m['best_val_epoch']})"
        if short:
            lines.append(f"| `{m['model']}` | {m['params']:,} | {ep} | {_f(m['final_test_acc'])} | "
                         f"{_f(m['test_acc_at_best_val'])} | {pa_s} | {_f(gap, 2)} |")
        else:
            lines.append(f"| `{m['model']}` | {m['family']} | {m['params']:,} | {m['macs_per_image'] / 1e6:.1f}M | {ep} | "
                         f"{_f(m['final_test_acc'])} | {bv} | {pa_s} | {_f(gap, 2)} | {label} |")
    srcs = [(m["model"], m["paper_number"]) for m in rows if m["paper_number"].get("accuracy") is not None]
    notes = [
        "",
        "Sources of the paper numbers: " + "; ".join(f"`{n}` ({p['of']}): {p['source']}" for n, p in srcs) + "."
        if srcs else "",
        "",
        "All rows: MNIST-rot **rebuilt** from raw MNIST (seed 2007): 10k train, 2k validation, 50k test; "
        "each card's recipe **scaled** to a CPU budget (fewer epochs, same schedule shape: `sweeps/zoo.yaml`); "
        "one seed. Test accuracies are on all 50k test digits.",
        f"† the paper's number: {BEST_TEST}, with the full recipe on the official archive "
        "(12k train); '(name)' = the number of the full-width paper model a `-small` variant reduces; "
        "'—' = no published number. The gap compares it with our best-validation-epoch accuracy; "
        "it is not a like-for-like comparison (data, epochs, selection all differ).",
    ]
    return "\n".join(lines + notes)


def write_report(path=None, *, log=print) -> Path:
    """Write the full zoo table (``figures/zoo.md``) from the committed manifests."""
    from .sweeps import REPO
    path = Path(path or REPO / "figures" / "zoo.md")
    text = ("# The trained zoo\n\nEvery model of `kit.models.list_models(pretrained=True)`, trained by the kit's own "
            "sweep (`sweeps/zoo.yaml`, `make zoo`); each row is read from its manifest `kit/weights/<model>.json`.\n\n"
            + zoo_markdown() + "\n")
    atomic_write_text(path, text)
    readme = REPO / "README.md"
    if readme.is_file() and "<!-- zoo-table -->" in readme.read_text():     # the README's short table
        r = readme.read_text()
        head, rest = r.split("<!-- zoo-table -->", 1)
        tail = rest.split("<!-- /zoo-table -->", 1)[1]
        atomic_write_text(readme, head + "<!-- zoo-table -->\n" + zoo_markdown(short=True).split("\n\n")[0]
                          + "\n<!-- /zoo-table -->" + tail)
    log(f"zoo table: {len(list_pretrained())} model(s) -> {path}")
    return path


# ------------------------------------------------------------- the instrument on trained models
def _calibration_digits(n: int = 256) -> torch.Tensor:
    from ..groups import disk_mask
    from ..data.sample import load_sample
    return load_sample()["images"][-n:] * disk_mask(28, 28).float()           # (n, 1, 28, 28)


def _digits(n: int) -> torch.Tensor:
    from ..groups import disk_mask
    from ..data.sample import load_sample
    return load_sample()["images"][:n] * disk_mask(28, 28).float()            # (n, 1, 28, 28)


def error_vs_angle_study(names=None, *, step: float = 5.0, digits: int = 8) -> dict:
    """For every zoo model (default: all with weights): the invariance error of its logits from 0 to
    360 degrees, trained and untrained twin (:func:`initial_twin`, batch norm calibrated on 256 real
    digits), each with its interpolation floor (:func:`kit.equivariance.error_vs_angle`), on
    ``digits`` digits of the bundled sample. Returns ``{name: {"trained": [Record], "initial": [Record]}}``."""
    from .. import models
    from ..equivariance import error_vs_angle
    names = list_pretrained() if names is None else list(names)
    if not 0 < step <= 360:
        raise ValueError(f"step must be in (0, 360] degrees, got {step}")
    angles = [i * step for i in range(int(round(360 / step)) + 1)]
    x, calib = _digits(digits), _calibration_digits()
    out = {}
    for n in names:
        trained = models.create(n, pretrained=True)
        twin = initial_twin(n, calibrate=calib)
        with torch.no_grad():
            out[n] = {"trained": error_vs_angle(trained, angles, x=x), "initial": error_vs_angle(twin, angles, x=x)}
    return out


def error_vs_angle_figure(study: dict, *, ncols: int = 3):
    """One panel per zoo model: logit invariance error vs angle, trained (solid) beside its untrained
    twin (dashed), with the interpolation floor of each (dotted); grid-exact angles marked. Sized for a
    notebook (<= 7.5 in wide, no text under 8 pt); the panels of a row share their y axis."""
    import matplotlib.pyplot as plt

    from ..explore.viz import plot_error_vs_angle
    names = list(study)
    ncols = max(1, min(ncols, len(names)))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.4, 1.95 * nrows + 1.1), squeeze=False, sharex=True,
                             sharey=True, layout="constrained")
    for ax, n in zip(axes.flat, names):
        for key, style, col in (("trained", "-", "tab:blue"), ("initial", "--", "tab:orange")):
            plot_error_vs_angle(ax, study[n][key], label=key, color=col, style=style, ms=0, lw=1.5, floor_lw=1.1)
        exact = [r.angle for r in study[n]["trained"] if r.element is not None]
        for e in exact:
            ax.axvline(e, color="0.85", lw=0.8, zorder=0)
        ax.set_yscale("log")
        ax.set_ylim(1e-9, 3)
        ax.set_yticks([1e0, 1e-3, 1e-6, 1e-9])
        ax.set_xticks(range(0, 361, 90))
        ax.set_xlim(0, 360)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(n, fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    last = {i % ncols: ax for i, ax in enumerate(axes.flat[:len(names)])}       # lowest panel of each column
    for ax in last.values():
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("rotation (degrees)", fontsize=9)
    fig.supylabel("relative logit error", fontsize=9)
    fig.get_layout_engine().set(wspace=0.05)
    h, l = axes.flat[0].get_legend_handles_labels()
    fig.legend(h, l, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Logit invariance vs rotation angle: trained zoo models (blue), untrained twins (orange)\n"
                 "grey lines: the group's elements; values < 1e-9 drawn at 1e-9", fontsize=10)
    return fig


def precision_rows(names=None, *, digits: int = 8) -> list[dict]:
    """For every zoo model, at the elements exact on the pixel grid: the float32 invariance error of
    the trained logits, its round-off floor (``check(..., roundoff=True)``) and the float64 error
    (:func:`kit.equivariance.float64_twin`); ``above_floor`` flags a float32 error above its floor."""
    from .. import models
    from ..equivariance import check, float64_twin
    names = list_pretrained() if names is None else list(names)
    x = _digits(digits)
    rows = []
    for n in names:
        m = models.create(n, pretrained=True)
        G = m.out_type.group
        exact = [g for g in G.elements if G.is_exact_on_grid(g) and g != G.identity]
        with torch.no_grad():
            r32 = check(m, exact, x=x, roundoff=True)
            r64 = check(float64_twin(m), exact, x=x.double())
        e32, fl, e64 = max(r.error for r in r32), max(r.floor for r in r32), max(r.error for r in r64)
        rows.append(dict(model=n, group=G.name, elements=[G.degrees(g) for g in exact] if not G.flip
                         else [f"{G.degrees(g):g}{'m' if g.f else ''}" for g in exact],
                         error_f32=e32, floor=fl, error_f64=e64,
                         above_floor=any(r.error > r.floor for r in r32)))
    return rows


def precision_markdown(rows) -> str:
    lines = ["| model | group | float32 error | round-off floor | float64 error | float32 above floor? |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        verdict = ("not exact by construction (float64 error too)" if r["error_f64"] > 1e-9
                   else "**yes**" if r["above_floor"] else "no")
        lines.append(f"| `{r['model']}` | {r['group']} | {r['error_f32']:.1e} | {r['floor']:.1e} | "
                     f"{r['error_f64']:.1e} | {verdict} |")
    return "\n".join(lines)


def study_markdown(study: dict, angles=(22.5, 45.0, 90.0)) -> str:
    """Logit invariance error at a few angles, trained vs untrained twin, with the floor."""
    head = " | ".join(f"{a:g}° trained / initial (floor)" for a in angles)
    lines = [f"| model | {head} |", "|---|" + "---|" * len(angles)]
    for n, res in study.items():
        t = {r.angle: r for r in res["trained"]}
        i = {r.angle: r for r in res["initial"]}
        cells = [f"{t[a].error:.1e} / {i[a].error:.1e} ({t[a].floor:.0e})" if a in t else "—" for a in angles]
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
