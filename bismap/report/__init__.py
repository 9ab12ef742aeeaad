"""The results report: the table of every evaluated model per run seed, laid out like BiSMAP Tables 1 and 4.

:mod:`~bismap.report.tables` writes one seed's table (per-class IoU, mIoU, the gain over
the warmup, the share of the warmup-to-oracle gap closed), :mod:`~bismap.report.seeds`
the same rows as mean ± std over the run seeds with the time per stage
(:mod:`~bismap.report.stage_times`), and :mod:`~bismap.report.spread` the mean ± std
both use.
"""
