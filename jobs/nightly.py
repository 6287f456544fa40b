"""Nightly job: `python jobs/nightly.py key=value ...` (same overrides as `memex nightly`).

One job for the night (audits every new checkpoint in turn):
    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --submission-id memex-nightly-$(date +%Y%m%d) -- \
            python jobs/nightly.py nightly=default nightly.location=/fsx/train/sd15-ft \
                nightly.base_model=/fsx/models/sd15 model=sd15 trainset=manifest trainset.path=s3://b/train.parquet \
                storage=s3 storage.root=s3://b/memex-runs resources=gpu ...
(nightly.location under /fsx, the host folder cluster.yaml mounts into every container; storage.root on S3:
without it the ledger lands in the job's working_dir, which Ray deletes, and every night audits all again;
model= gives the checkpoints' kind, and trainset.path their training set: the defaults are the demo's.)
One job per checkpoint (ids from `memex nightly nightly.action=plan`; Ray refuses a reused id):
    ray job submit ... --submission-id <id> --no-wait -- python jobs/nightly.py nightly.only=<checkpoint> ...
Exit status: 0 ok, 1 an audit or the webhook failed, 3 a checkpoint crossed nightly.budget or
nightly.growth_margin (Ray marks the job FAILED for any non-zero status).
"""

import sys
from pathlib import Path

# Import memex from this checkout (the Ray working_dir), not an older copy installed in the image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memex.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv.insert(1, "nightly")
    main()
