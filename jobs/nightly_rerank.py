"""Entrypoint for the nightly rerank under `ray job submit` (or KubeRay's RayJob).

    ray job submit --working-dir . -- \\
        python jobs/nightly_rerank.py --config jobs/configs/nightly.yaml --date 2026-11-26

`{date}` in the config's candidates and output becomes --date (default: today,
UTC); rerank options after --config override the file. Exits 0 only on success;
the last line on stdout is one JSON record: status, date, output, pairs,
queries, seconds, already_done (and error on failure). See rstar_batch/nightly.py.
"""

import sys

from rstar_batch import nightly

if __name__ == "__main__":
    sys.exit(nightly.entrypoint(sys.argv[1:]))
