"""Settings shared by the fuzz tests (tests/**/test_*_fuzz.py): every input a parser meets must either load or
raise a moekit error, never another exception.

CI runs few examples per target (deterministically: the ``ci`` profile in tests/conftest.py). Run many more
locally with ``MOEKIT_FUZZ_EXAMPLES=20 pytest tests -k fuzz --hypothesis-show-statistics`` (20 times as many),
adding ``HYPOTHESIS_PROFILE=random`` for examples CI has not seen.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from hypothesis import HealthCheck, event, settings
from hypothesis.control import currently_in_test_context

from moekit.errors import MoekitError

T = TypeVar("T")


def scale() -> int:
    """The MOEKIT_FUZZ_EXAMPLES multiplier (1 unless set)."""
    raw = os.environ.get("MOEKIT_FUZZ_EXAMPLES", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"MOEKIT_FUZZ_EXAMPLES={raw!r} must be a positive integer (a multiplier)")
    return int(raw)


def fuzz(examples: int) -> settings:
    """Hypothesis settings for a fuzz target: ``examples`` x MOEKIT_FUZZ_EXAMPLES examples, no deadline (the
    suite's time limit catches a hang; tests never assert times)."""
    return settings(
        max_examples=examples * scale(),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def outcome(label: str) -> None:
    """Count ``label`` ("loaded", "refused: DataError") in hypothesis's statistics (``--hypothesis-show-statistics``);
    a no-op when a helper runs outside a hypothesis test."""
    if currently_in_test_context():
        event(label)


def loaded_or_refused(load: Callable[[], T], loaded: str = "loaded") -> T | None:
    """What ``load()`` returns, or None when it refuses with a moekit error; the outcome is counted either way.
    Any other exception propagates: that is the crash a fuzz test looks for."""
    try:
        result = load()
    except MoekitError as e:
        outcome(f"refused: {type(e).__name__}")
        return None
    outcome(loaded)
    return result
