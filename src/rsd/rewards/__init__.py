"""Process reward models: the formats users bring, loaded in process, or any Python callable.

`load_prm` imports torch and transformers only when called, so importing this package stays cheap (the CLI needs
`PRM_FORMATS` for its help text).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rsd.core import DEFAULT_DELIMITER
from rsd.rewards.formats import PRM_FORMATS, TRL_STEP_SEPARATOR, detect_prm_format
from rsd.rewards.rules import CallableReward

if TYPE_CHECKING:
    from rsd.rewards.hf import HFRewardModel

__all__ = ["PRM_FORMATS", "CallableReward", "detect_prm_format", "load_prm"]


def load_prm(
    model: str,
    prm_format: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    delimiter: str = DEFAULT_DELIMITER,
    step_separator: str = TRL_STEP_SEPARATOR,
    max_batch_size: int = 16,
) -> HFRewardModel:
    """Load a PRM checkpoint as a RewardModel; `rsd.rewards.hf.load_prm` documents the options."""
    from rsd.rewards import hf

    return hf.load_prm(model, prm_format, device, dtype, trust_remote_code, delimiter, step_separator, max_batch_size)
