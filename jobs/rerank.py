"""Entrypoint for `ray job submit`: the same options as `rstar-batch rerank`.

    ray job submit --working-dir . -- python jobs/rerank.py --config jobs/configs/rerank.yaml

Under `ray job submit` the driver joins the job's cluster (RAY_ADDRESS is set
for it), so no --address is needed.
"""

import sys

from rstar_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["rerank", *sys.argv[1:]]))
