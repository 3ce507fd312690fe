"""Backends: ``torch`` (reference, everywhere), ``triton`` (fused kernels), ``cuda`` (compiled extension)."""
