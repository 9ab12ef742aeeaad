"""The Source Transferability Map (STM, BiSMAP Sec. 3.4, Eq. 7-9): how far each source pixel is from the target.

:mod:`~bismap.stm.embeddings` is the third-party embedding network \\hat{E},
:mod:`~bismap.stm.clustering` its FAISS K-Means and nearest-prototype search (Eq. 7),
:mod:`~bismap.stm.target` the target side (embedding sample, prototypes {A_j}, class
entropy e_c of Eq. 8), :mod:`~bismap.stm.source` the source side (d_mean and one weight
map per source image), and :mod:`~bismap.stm.weights` the numerical core of Eq. 8-9
(entropies, weights and their 16-bit PNG code), which the training loaders read back.
"""
