"""Audit job: `python jobs/audit.py key=value ...` (same overrides as `memex audit`).

From a laptop against a cluster, through `ray dashboard cluster.yaml` (it forwards the head's
:8265 here; the head's security group need not open it), Ray setting RAY_ADDRESS for the driver:
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/audit.py model=local model.path=/fsx/ckpt/step-20000 trainset=manifest \
            trainset.path=s3://b/train.parquet storage=s3 storage.root=s3://b/memex-runs resources=gpu index=ivfpq
"""

import sys
from pathlib import Path

# Import memex from this checkout (the Ray working_dir), not an older copy installed in the image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memex.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv.insert(1, "audit")
    main()
