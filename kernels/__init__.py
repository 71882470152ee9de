"""Triton kernels, installed as ``cpift_dist.kernels`` (a PyPI package named ``kernels`` exists)."""
