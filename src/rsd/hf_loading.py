"""Loading Hugging Face checkpoints the same way for every role, with errors a user can act on."""

from __future__ import annotations

import contextlib
import functools
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


BUILTIN_MODEL = "tinyworld"
BUILTIN_ROLES = ("draft", "target", "prm")
BUILTIN_SPELLINGS = "tinyworld (the role's own model) or tinyworld:draft, tinyworld:target, tinyworld:prm"
HUB_PROBE_TIMEOUT_S = 10.0


def builtin_model_path(name: str, role: str) -> Path | None:
    """The folder of a built-in model: `tinyworld` is the tiny world's model of `role` (its draft in the draft
    slot, and so on), `tinyworld:ROLE` names one of them anywhere; None for any other name."""
    base, _, which = name.strip().partition(":")
    if base != BUILTIN_MODEL:
        return None
    which = which or role
    if which not in BUILTIN_ROLES:
        raise RSDError(f"unknown built-in model {name!r} for the {role}; use {BUILTIN_SPELLINGS}.")
    return Path(__file__).resolve().parent / "tinyworld" / "models" / which


def is_builtin_model(name: object) -> bool:
    return isinstance(name, str) and name.strip().partition(":")[0] == BUILTIN_MODEL


def looks_like_local_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or Path(name).expanduser().exists()
        or name.count("/") > 1
        or "\\" in name
        or name.endswith("/")
    )


def check_model_source(name: str, role: str) -> str:
    """What to load for a model argument: a built-in model's folder, a local folder (it must hold a config.json),
    or a hub id. A name that can be neither a folder nor a hub model fails here at once, in one line, instead of
    after the hub's retries; so does a hub id that is not cached while the hub is offline or unreachable."""
    if not name:
        raise RSDError(f"no {role} model given; pass --{role} with a local folder, a Hugging Face hub id or tinyworld.")
    builtin = builtin_model_path(name, role)
    if builtin is not None:
        return str(builtin)
    if looks_like_local_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise RSDError(
                f"{role} model not found: {name} does not exist; pass a folder holding a "
                "Hugging Face checkpoint (config.json, weights, tokenizer), a hub id or tinyworld."
            )
        if not (path / "config.json").is_file():
            raise RSDError(f"{role} model {name} has no config.json; pass the folder of a Hugging Face checkpoint.")
        return str(path)
    check_hub_model(name, role)
    return name


def check_hub_model(name: str, role: str) -> None:
    """Refuse a name that is not a folder and that the hub cannot give us: a misspelt built-in name, an invalid
    hub id, or an uncached model while offline (HF_HUB_OFFLINE, or no network)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    not_local = f"{role} model {name!r} is not a local folder"
    if name.lower().startswith(BUILTIN_MODEL) or ":" in name:
        raise RSDError(f"{not_local} nor a built-in model; built-in names: {BUILTIN_SPELLINGS}.")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise RSDError(f"{not_local} nor a valid Hugging Face hub id (owner/name); check the spelling.") from None
    if is_cached(name):
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise RSDError(
            f"{not_local}, and it is not in the Hugging Face cache while the hub is offline (HF_HUB_OFFLINE=1); "
            f"pass a checkpoint folder, tinyworld, or download it once where there is a network (hf download {name})."
        )
    problem = hub_problem(name)
    if problem:
        raise RSDError(f"{not_local}, and {problem}")


def is_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


@functools.lru_cache(maxsize=64)
def hub_problem(name: str) -> str | None:
    """Why the hub cannot give this model (one clause), or None when it can or another error is the hub's to
    tell. One quick request, so no network costs seconds, not the minute of the download's retries."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        huggingface_hub.model_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return None  # it exists: the download says what access it needs
    except RepositoryNotFoundError:
        return (
            "the Hugging Face hub has no model of that name (or it is private: log in with `hf auth login`); "
            "check the spelling, or pass a checkpoint folder or tinyworld."
        )
    except Exception as exc:  # connection refused, DNS, timeout, proxy: the hub is out of reach
        if is_connection_error(exc):
            return (
                f"the Hugging Face hub cannot be reached ({first_line(exc)}): offline? Pass a checkpoint folder or "
                "tinyworld, or download the model once where there is a network and set HF_HUB_OFFLINE=1."
            )
    return None


def is_connection_error(exc: BaseException) -> bool:
    """Whether an exception of the hub client means no connection (httpx or requests, by class name)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "TimeoutException", "ConnectionError", "Timeout",
                         "ProxyError", "OfflineModeIsEnabled", "NetworkError"})  # fmt: skip


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
