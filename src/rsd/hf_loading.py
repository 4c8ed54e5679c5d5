"""Loading Hugging Face checkpoints the same way for every role, with errors a user can act on."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rsd.core import RSDError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> str:
    """`auto` picks CUDA when it is there, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RSDError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise RSDError(f"--device {device}: unknown device; use cpu, cuda, cuda:N or auto.")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """`auto`: bfloat16 on CUDA, float32 on the CPU (exact comparisons in tests need float32)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise RSDError(f"--dtype {dtype}: unknown dtype; use one of {', '.join(DTYPES)}.")
    return getattr(torch, dtype)


def looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def check_model_source(name: str, role: str) -> str:
    """A local folder must hold a config.json; a hub id is passed on (the hub gives its own errors)."""
    if not name:
        raise RSDError(f"no {role} model given; pass --{role} with a local folder or a Hugging Face hub id.")
    if looks_like_local_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise RSDError(
                f"{role} model not found: {name} does not exist; pass a folder holding a "
                "Hugging Face checkpoint (config.json, weights, tokenizer) or a hub id."
            )
        if not (path / "config.json").is_file():
            raise RSDError(f"{role} model {name} has no config.json; pass the folder of a Hugging Face checkpoint.")
        return str(path)
    return name


def read_config(name: str) -> dict:
    """The raw config.json of a local checkpoint, or of a hub one through transformers."""
    path = Path(name).expanduser() / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name).to_dict()


def load_tokenizer(name: str, role: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RSDError(
            f"could not load the {role} tokenizer from {name}: {first_line(exc)}; "
            f"pass a checkpoint folder that holds its tokenizer files."
        ) from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def attention_without_cudnn(device: str | Any) -> Iterator[None]:
    """Keep SDPA off cuDNN's attention on CUDA; elsewhere, change nothing.

    Our forwards carry 2-D masks with holes (rows of one call hold caches of different lengths), and with a mask
    torch >= 2.11 on Hopper prefers cuDNN attention, which builds an execution plan for every new (batch, length)
    shape: every decode step is a new length. Measured on an H200 at batch 16 (docs/benchmarks.md), RSD took
    29.0 s this way against 50.4 s with cuDNN allowed. Flash attention takes no mask, so masked calls go to the
    memory-efficient kernel.
    """
    if not str(device).startswith("cuda"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """A hash of id -> token string, added and special tokens included, and of which ids are special."""
    vocab = sorted((index, token) for token, index in tokenizer.get_vocab().items())
    special = sorted(tokenizer.all_special_ids)
    digest = hashlib.sha256(repr((vocab, special)).encode("utf-8"))
    return digest.hexdigest()
