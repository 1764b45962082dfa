"""Helpers shared by the tests of the trained zoo's explorers (not a test module)."""
import matplotlib.text
import pytest

from kit import models

HAVE = set(models.list_models(pretrained=True))


def needs(name):
    """Skip, naming the fix, when ``name`` has no committed zoo weights."""
    return pytest.mark.skipif(name not in HAVE, reason=f"no zoo weights for {name} in kit/weights yet "
                                                       f"(kit.models.list_models(pretrained=True) lacks it; "
                                                       f"train and export it: make zoo)")


def small_fonts(fig, minimum=9):
    """Visible texts of ``fig`` below ``minimum`` pt: ``[(text, size)]``."""
    return [(t.get_text(), t.get_fontsize()) for t in fig.findobj(matplotlib.text.Text)
            if t.get_text().strip() and t.get_visible() and t.get_fontsize() < minimum]
