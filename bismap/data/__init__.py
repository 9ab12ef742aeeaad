"""Datasets: the embedded digit-scenes benchmark, real-dataset formats, loaders."""
