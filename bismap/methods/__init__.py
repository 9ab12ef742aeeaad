"""The defining computations of the BiSMAP family: one module per method, plus shared prototypes.

* :mod:`bismap.methods.prototypes`: class centroids, their momentum update,
  pixel-to-prototype distances and similarities, nearest-prototype assignment
  with a margin (used by all four methods and by ``bismap.labels.strategies``).
* :mod:`bismap.methods.proda`: ProDA (paper 001), Eq. 3-10.
* :mod:`bismap.methods.cpsl`: CPSL (paper 002), Eq. 1, 4-13.
* :mod:`bismap.methods.contrastive`: bi-directional contrastive learning (paper 003), Eq. 1-10.
* :mod:`bismap.methods.cag`: CAG-UDA (paper 004), Eq. 4-12 and the stagewise schedule.
* :mod:`bismap.methods.alignment`: class-distribution alignment of BiSMAP's
  self-training targets (this project's addition; ReMixMatch-style, with CPSL
  Eq. 11's running class distribution).

Every loss has the ``*_pixels`` form of :mod:`bismap.losses`: per-pixel values
and the mask of the pixels that count, for ``masked_mean`` / ``masked_sum``.
Every labeler returns (labels, score) with 255 = ignore, like
``bismap.labels.strategies.assign_*``. This package imports none of its modules
here, so importing one method never loads the others.
"""
