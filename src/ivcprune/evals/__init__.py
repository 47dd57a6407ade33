"""Benchmarks at scale: readers of the benchmark formats, rule-based answer extraction, metrics,
resumable / data-parallel runs and comparison tables (``ivcprune eval | score | compare``)."""

from .answers import extract_choice, extract_yes_no

__all__ = ["extract_choice", "extract_yes_no"]
