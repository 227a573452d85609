"""Shared test settings: deterministic, single-threaded-friendly torch."""

import os

import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
