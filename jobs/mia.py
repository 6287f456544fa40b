"""Membership-inference job: `python jobs/mia.py key=value ...` (same overrides as `memex mia`).

From a laptop against a cluster (Ray sets RAY_ADDRESS for the driver it starts):
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/mia.py model=local model.path=/ckpt/step-20000 members.path=s3://b/train.parquet \
            nonmembers.path=s3://b/heldout.parquet storage=s3 resources=gpu
"""

import sys
from pathlib import Path

# Import memex from this checkout (the Ray working_dir), not an older copy installed in the image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memex.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv.insert(1, "mia")
    main()
