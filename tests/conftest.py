"""Shared test settings: deterministic, single-threaded-friendly torch, and a deterministic hypothesis profile."""

import os

import torch
from hypothesis import settings

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# CI draws the same examples on every run (derandomized, no example database on disk), so a failure reproduces
# and a run never depends on what an earlier one stored. The fuzz tests' example counts scale with
# MOEKIT_FUZZ_EXAMPLES (tests/fuzzing.py); set HYPOTHESIS_PROFILE=random for fresh random examples.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("random", database=None, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
