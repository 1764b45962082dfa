"""eqkit: import what you use (``import kit.models``, ``from kit.layers import GroupConv``). Two
shortcuts are resolved on first use: :func:`kit.load_run` (a trained model back from a run folder) and
:func:`kit.export` (a plain-PyTorch copy of a model for deployment)."""


def __getattr__(name):
    if name == "load_run":
        from .run.train import load_run
        return load_run
    if name == "export":
        from .models.export import export
        return export
    raise AttributeError(f"module 'kit' has no attribute {name!r}")
