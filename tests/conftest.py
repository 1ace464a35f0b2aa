"""Shared test setup. Triton kernels run under the interpreter on CPU machines: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, at collection time."""

import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
