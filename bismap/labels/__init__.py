"""Target pseudo-labels: BiSMAP's Multiple Anisotropic Prototypes (MAPs, Sec. 3.3, Eq. 3-6) and the baselines.

:mod:`~bismap.labels.features` samples the correctly classified source features (Eq. 3),
:mod:`~bismap.labels.mixture` and :mod:`~bismap.labels.gmm` fit one GMM per class on
them (Eq. 4-5), :mod:`~bismap.labels.strategies` labels the target set by MAPs (Eq. 6)
or by a baseline (CAG-UDA's category anchors, confidence thresholds), and
:mod:`~bismap.labels.quality` measures those labels against the truth (Table 5).
"""
