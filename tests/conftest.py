"""Shared test setup. Triton kernels run under the interpreter on CPU machines: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, at collection time. Torch runs
one intra-op thread in tests (DSA_TEST_THREADS overrides)."""

import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tests use small tensors: one intra-op thread is as fast, and it does not collapse when the
    # 2-core machine is shared (two spinning OpenMP threads made small ops 10-30x slower).
    torch.set_num_threads(int(os.environ.get("DSA_TEST_THREADS", "1")))
