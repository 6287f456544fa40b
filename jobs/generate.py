"""Generation job: `python jobs/generate.py key=value ...` (same overrides as `memex generate`).

From a laptop against a cluster:
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/generate.py model=sd15 prompts=captions prompts.path=s3://b/train.parquet \
            sampling=paper storage=s3 storage.root=s3://b/memex-runs resources=gpu
(storage=s3 alone reads s3://$MEMEX_BUCKET/runs on the head, and is refused there without it: a job does not
carry the laptop's environment, so give storage.root, or --runtime-env-json '{"env_vars": {"MEMEX_BUCKET": "b"}}'.)
"""

import sys
from pathlib import Path

# Import memex from this checkout (the Ray working_dir), not an older copy installed in the image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memex.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv.insert(1, "generate")
    main()
