"""Timing helpers shared by the bench scripts: wall time of one call (with CUDA synchronised), and
timers wrapped around an object's methods to show where a run's time goes."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable


def elapsed(fn: Callable[[], Any], device: str) -> float:
    """Seconds `fn()` takes; on CUDA the queue is drained before and after (kernels run async)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def timers(device: str) -> tuple[dict[str, list], Callable[[Callable, str], Callable]]:
    """(acc, timed): `timed(fn, key)` returns fn wrapped so that each call adds its seconds and one
    call to acc[key] = [seconds, calls]."""
    acc: dict[str, list] = defaultdict(lambda: [0.0, 0])

    def timed(fn: Callable, key: str) -> Callable:
        def wrapper(*args, **kw):
            out = []
            acc[key][0] += elapsed(lambda: out.append(fn(*args, **kw)), device)
            acc[key][1] += 1
            return out[0]
        return wrapper

    return acc, timed
