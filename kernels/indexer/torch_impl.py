"""Fast CPU PyTorch path for indexer (TEMPORARY: delegates to naive.py until the blocked version lands)."""

from kernels.indexer.naive import *
