"""memex/redact.py's free-text scan (redact_text: every log record of a `memex` command goes through it),
before and after the review's fix, side by side: long runs of `name:` / `name=` (the old assignment scan was
quadratic) and of `word.` / `word-` (the old URL pattern was), and a realistic log line many times (no loss).
The old scan is tests/test_redact_review.py's reference; both must give the same text.

    python bench/bench_redact.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_redact_review import old_redact_text  # noqa: E402

from memex.redact import redact_text  # noqa: E402


def best(f, text: str, repeat: int = 1, runs: int = 3) -> float:
    """The fastest of `runs` (the least disturbed by other processes on a shared machine)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(repeat):
            f(text)
        times.append(time.perf_counter() - t0)
    return min(times)


print(f"{'text':<44} {'old s':>8} {'new s':>8}")
for unit in ("a:", "a=", "a.", "a-"):
    for n in (12_500, 25_000, 50_000):
        text = unit * (n // len(unit))
        assert redact_text(text) == old_redact_text(text)
        label = f"{n:>6} chars of {unit * 3}..."
        print(f"{label:<44} {best(old_redact_text, text):>8.2f} {best(redact_text, text):>8.3f}")
line = ("2026-12-08 match: shard 17 of 64: s3://bucket/laion/part-00017.tar, 4096 images, storage.options.key=AKIA "
        "token: ghp_abc https://u:p@host/x?sig=abc&sv=2020 done in 3.2s")
assert redact_text(line) == old_redact_text(line)
old, new = zip(*((best(old_redact_text, line, 10_000, 1), best(redact_text, line, 10_000, 1)) for _ in range(5)))
print(f"{f'a {len(line)}-char log line x 10,000':<44} {min(old):>8.2f} {min(new):>8.3f}")
