"""Routing analysis: expert load, statistics, specialisation and reports."""

from moekit.analysis.load import expert_load

__all__ = ["expert_load"]
