"""The one percentile every benchmark and the DR test's query benchmark report.

Three definitions (nearest rank, n=1000 quantiles, n=100 quantiles) gave three different
"p95"s for the same samples; with one definition the figures of different benches and
of different runs can be put side by side.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: int) -> float:
    """The ``q``-th percentile (1..99) of ``samples``, by the inclusive method.

    Inclusive interpolates between the two nearest samples and never extrapolates beyond
    the smallest or largest one, so a p95 of 7 samples is at most their maximum (the
    exclusive method would invent a value above it).
    """
    if not 1 <= q <= 99:
        raise ValueError(f"percentile q must be 1..99, not {q}")
    if not samples:
        raise ValueError("percentile of no samples")
    if len(samples) == 1:
        return float(samples[0])
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]
