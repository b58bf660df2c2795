"""Triton kernels, one family per file, each with a shape-checking wrapper and a torch reference.
Leaf package: imports nothing of ours."""
