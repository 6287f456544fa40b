"""Membership-inference job: `python jobs/mia.py key=value ...` (same overrides as `memex mia`).

From a laptop against a cluster, through `ray dashboard cluster.yaml` (it forwards the head's
:8265 here; the head's security group need not open it), Ray setting RAY_ADDRESS for the driver:
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/mia.py model=local model.path=/fsx/ckpt/step-20000 members.path=s3://b/train.parquet \
            nonmembers.path=s3://b/heldout.parquet storage=s3 storage.root=s3://b/memex-runs resources=gpu
(local paths: under /fsx, the host folder cluster.yaml mounts into every container.)
"""

import sys
from pathlib import Path

# Import memex from this checkout (the Ray working_dir), not an older copy installed in the image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memex.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv.insert(1, "mia")
    main()
