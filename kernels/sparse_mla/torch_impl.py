"""Fast CPU PyTorch path for sparse_mla (TEMPORARY: delegates to naive.py until the blocked version lands)."""

from kernels.sparse_mla.naive import *
