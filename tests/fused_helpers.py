"""Helpers for the tests of the fused C++ kernels (a module of its own: `conftest` names two files here)."""
import pytest


def built_or_skip(ext, what: str):
    """A fused C++ extension of the kit: returned when built; a test failure where a C++ compiler is here
    (it must build), a skip where there is none (the plain-PyTorch path is used)."""
    import shutil
    if ext is None:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"a C++ compiler is here, the fused {what} must build")
        pytest.skip(f"no C++ compiler: the plain-PyTorch {what} is used")
    return ext
