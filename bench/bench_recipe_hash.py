"""memex train's training-set digest (memex/training.py: recipe): sha256 of the decoded images
hashed in place (a memoryview of the tensor) against .tobytes() (a second copy of them), on the
same 500 MB of float32, alternated in one process; both must give the same digest.

    python bench/bench_recipe_hash.py
"""

import hashlib
import time

import numpy as np
import torch

x = torch.rand(125_000_000)  # 500 MB of float32: ~160 decoded 512x512 RGB training images


def plain() -> str:
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()


def memex() -> str:  # what training.recipe does
    return hashlib.sha256(memoryview(np.ascontiguousarray(x.numpy())).cast("B")).hexdigest()


times: dict[str, list[float]] = {}
for f in (plain, memex) * 3:
    t0 = time.perf_counter()
    f()
    times.setdefault(f.__name__, []).append(time.perf_counter() - t0)
assert plain() == memex()
p, m = sorted(times["plain"])[1], sorted(times["memex"])[1]
print(f"tobytes + sha256: {p:.2f} s ; in place: {m:.2f} s ; ratio {p / m:.2f}x (medians of 3, same digest; "
      "in place needs no second 500 MB)")
