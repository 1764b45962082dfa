"""Teaching equivariance: the checkers behind the lesson track (``notebooks/lessons/``).

* :mod:`kit.teach.exercises` — one checker per exercise: ``teach.check("2.2", group_conv)`` runs the
  student's function on fixed inputs, checks shapes, measures its equivariance with the kit's own
  instrument (:mod:`kit.equivariance`) and compares it with the kit's layers; a wrong answer gets a
  specific hint (rotated the wrong way, group axis rolled the wrong way, missing the shift, ...).
* :mod:`kit.teach.mistakes` — the typical wrong answers the hints are written for (the tests run
  every checker against each of them).
* :mod:`kit.teach.lessons` — the lessons' sources hold the solutions between ``# BEGIN SOLUTION`` /
  ``# END SOLUTION`` markers; the student versions are generated from them (``python -m kit lessons``),
  so the two cannot drift apart.
* :mod:`kit.teach.figures` — the lessons' own figures (the pixel grid under a rotation, the round-trip
  interpolation error) and the one explorer of lesson 3.

The checkers take the right answer from the kit itself (its layers, the field action, the
instrument), not from a copy of the lessons' solutions; the solutions live in the lessons' sources only.
"""
from .exercises import EXERCISES, Verdict, as_module, check
from .figures import digits

__all__ = ["EXERCISES", "Verdict", "as_module", "check", "digits"]
