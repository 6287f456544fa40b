"""The old code and the new, each measured in a fresh Python process (a process's peak RSS only grows, and a
warm allocator or import hides the other side's cost): what the memory benches print side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = str(Path(__file__).resolve().parent)


def old_and_new(child: str, folder: str, *args: str) -> dict[str, dict]:
    """side -> the JSON `child` wrote, for side "old" then "new": `child` (a script's code) run with argv
    [side, *args, <folder>/<side>.json, bench/] (bench/ for its imports: references.py holds the old side)."""
    got = {}
    for side in ("old", "new"):
        out = f"{folder}/{side}.json"
        subprocess.run([sys.executable, "-c", child, side, *args, out, BENCH], check=True)
        with open(out) as f:
            got[side] = json.load(f)
    return got
