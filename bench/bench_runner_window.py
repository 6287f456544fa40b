"""The driver's cost of dispatching a stage's units as Ray tasks (memex/runner.py run_tasks): every unit
submitted at once, then one ray.wait over all the pending ones per finished unit (memex before), against
a window of 2x the cluster's slots in flight, topped up as tasks finish (memex now: runner.windowed).

    python bench/bench_runner_window.py                    # 20,000 trivial tasks on a 2-CPU local Ray
    python bench/bench_runner_window.py --units 5000 --cpus 4

Ray 2.60's ray.wait checks every ref it is given in Python and builds a set of them before it waits, so
waiting for one unit at a time over N pending refs costs O(N) driver CPU per unit, O(N^2) per stage (29 ms
a call at 100k refs). Both sides run the same trivial 1-CPU task (no unit files or markers: the driver's
loop alone), each in a fresh subprocess with its own local Ray instance (its workers started by a few
tasks first), and must see every task return (asserted). Driver CPU is the subprocess's user + system
time (resource.getrusage: its Python thread and Ray's core-worker threads) over the dispatch alone.
  plain  every task submitted, then ray.wait(pending, num_returns=1) per task (the code before)
  memex  runner.windowed: runner.window_for(...) tasks in flight (2 per CPU here), topped up as they finish
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def nothing(index: int) -> int:
    return index


def submit_all(task, n: int) -> list[int]:
    """run_tasks' loop as it was: every task submitted up front, one ray.wait over the pending ones per task."""
    import ray

    pending = [task.remote(i) for i in range(n)]
    out = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        out += ray.get(ready)
    return out


def in_window(task, n: int) -> list[int]:
    from memex import runner

    request = {"CPU": 1.0}
    return [i for done in runner.windowed(task.remote, range(n), lambda: runner._window(request)) for i in done]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def side(kind: str, n: int, cpus: int) -> None:
    import ray

    from memex import runner

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    task = ray.remote(num_cpus=1)(nothing)
    ray.get([task.remote(i) for i in range(4 * cpus)])  # the workers started
    loop = submit_all if kind == "plain" else in_window
    c0, t0 = cpu(), time.perf_counter()
    out = loop(task, n)
    seconds, driver = time.perf_counter() - t0, cpu() - c0
    assert sorted(out) == list(range(n)), kind
    window = runner._window({"CPU": 1.0})
    print(json.dumps({"seconds": seconds, "driver_cpu_s": driver, "in_flight": n if kind == "plain" else window}))
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=20_000, help="units (one Ray task each)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side(a.side, a.units, a.cpus)
    print(f"{a.units} trivial 1-CPU Ray tasks, on a local Ray with {a.cpus} CPUs", flush=True)
    out = {}
    for kind in ("plain", "memex"):
        r = subprocess.run([sys.executable, __file__, "--side", kind, "--units", str(a.units), "--cpus", str(a.cpus)],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{kind} failed:\n{r.stderr[-3000:]}")
        out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{'side':<6} {'in flight':>10} {'driver CPU s':>13} {'wall s':>8}")
    for kind, o in out.items():
        print(f"{kind:<6} {o['in_flight']:>10} {o['driver_cpu_s']:>13.1f} {o['seconds']:>8.1f}")
    p, m = out["plain"], out["memex"]
    print(f"memex / plain: {p['driver_cpu_s'] / m['driver_cpu_s']:.1f}x less driver CPU, "
          f"{p['seconds'] / m['seconds']:.2f}x the speed; every task returned on both sides")


if __name__ == "__main__":
    main()
