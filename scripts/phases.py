"""Time spent in named phases of a step, for the profiling scripts (imported by them; run them
from the repository root with PYTHONPATH=src): wrap a function with `timed` and each call adds
its duration to SPENT under that name."""

import collections
import time

SPENT: dict[str, float] = collections.defaultdict(float)


def timed(name: str, fn):
    """fn, adding the duration of each call to SPENT[name]."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start
    return wrapper
