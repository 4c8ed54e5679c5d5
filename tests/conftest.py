"""Test-wide settings that must be in place before any test module imports its libraries, and the `device`
parameter: every test that takes it runs on the CPU, and on CUDA where a GPU is present."""

import functools
import os

# The tests' models are tiny: torch's intra-op threads gain little on them and, where other jobs share the cores,
# cost several-fold (threads wait on each other at every small matrix product; one test took 16 s with one thread
# against 220 s with two on a loaded 2-core machine). Set before torch is imported; subprocesses (the CLI tests)
# inherit it. The vLLM servers of the served tests set their own.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

CUDA = torch.cuda.is_available()

# Without CUDA, rsd's Triton kernels (rsd.engine.kernels) run through Triton's interpreter. Triton reads this when
# it defines its own language functions, at import, so it is set before any module imports triton (transformers'
# model classes do; torch does not). With CUDA the kernels run compiled, on the "cuda" parameter.
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreter_without_overflow_checks() -> None:
    """Triton's interpreter builds an overflow check for every int32 operation of a kernel (its address
    arithmetic) and then drops it, since its debug option is off: a third of a kernel test's time. Not built here."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton: the kernel tests skip
        return
    options = getattr(interpreter, "InterpreterOptions", None)
    fields = getattr(options, "__dataclass_fields__", {})
    if "sanitize_overflow" in fields and "debug" in fields and not fields["debug"].default:
        interpreter.InterpreterOptions = functools.partial(options, sanitize_overflow=False)


if os.environ.get("TRITON_INTERPRET") == "1":
    interpreter_without_overflow_checks()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The torch device a test runs on: "cpu" always, "cuda" where a GPU is present."""
    return request.param
