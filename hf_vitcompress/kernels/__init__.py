"""Triton kernels for factorized layers, each with a PyTorch reference and fallback."""
