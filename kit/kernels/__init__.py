"""Kernel machinery shared by the layer families: the intertwiner solver and its cache
(:mod:`kit.kernels.intertwiners`). Depends on the core (:mod:`kit.groups`, :mod:`kit.reps`) only;
the layers (:mod:`kit.layers`) build on it."""
