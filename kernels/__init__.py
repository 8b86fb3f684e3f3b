"""Triton kernels (installed as pyattn.kernels)."""
