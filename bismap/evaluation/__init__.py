"""Evaluation of trained models on a labelled domain: per-class IoU and mIoU, as in BiSMAP's result tables.

:mod:`~bismap.evaluation.metrics` holds the confusion matrix, IoU, mIoU and their
Markdown/PNG renderings (also used by the pseudo-label quality report and the results
tables), :mod:`~bismap.evaluation.evaluate` evaluates one checkpoint, and
:mod:`~bismap.evaluation.qualitative` draws the qualitative figure of the report.
"""
