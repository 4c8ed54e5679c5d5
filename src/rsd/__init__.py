"""rsd: Reward-Guided Speculative Decoding."""
