"""Helpers for tests and benchmarks that need real model servers."""
