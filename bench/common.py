"""What every benchmark shares: timing percentiles, the machine and its load, one JSON line out."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any


def machine() -> str:
    """CPU model, core count and Python: enough to compare figures between runs."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}; {os.cpu_count()} cores; Python {platform.python_version()}"


def load() -> list[float]:
    """1-, 5- and 15-minute load averages (``os.getloadavg``): figures mean little without it."""
    return [round(x, 2) for x in os.getloadavg()]


def time_calls(call: Callable[[], object], n: int) -> list[float]:
    """Wall time of n calls, in milliseconds."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


def emit(figure: str, samples_ms: list[float], **extra: Any) -> None:
    """Print one JSON line with p50/p99 of the samples and any extra fields."""
    line = {
        "figure": figure,
        "p50_ms": round(percentile(samples_ms, 50), 3),
        "p99_ms": round(percentile(samples_ms, 99), 3),
        "n": len(samples_ms),
        **extra,
        "machine": machine(),
        "load": load(),
    }
    print(json.dumps(line), flush=True)
