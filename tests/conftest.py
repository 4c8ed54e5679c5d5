"""Test-wide settings that must be in place before any test module imports its libraries."""

import os

# Off CUDA, rsd's Triton kernels (rsd.backends.split_attention) run through Triton's interpreter. Triton reads this
# when it defines its own language functions, at import, so it is set before any module imports triton.
if not os.environ.get("RSD_TEST_DEVICE", "cpu").startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
