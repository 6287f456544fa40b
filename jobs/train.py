"""Training job: `python jobs/train.py key=value ...` (same overrides as `memex train`).

Several GPUs on one node: `accelerate launch --num_processes 4 jobs/train.py arch=uncond_small output=...`
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memex.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv.insert(1, "train")
    main()
