"""Entrypoint for corpus-wide scoring under `ray job submit` (or KubeRay's RayJob).

    ray job submit --working-dir . -- \
        python jobs/score_corpus.py --config jobs/configs/score_corpus.yaml --date 2026-11-26

Every query of the config's `queries` is scored against every passage of its
`corpus`; the best `top_k` per query are written, ranked, to `output`. `{date}`
in the output (required) and in the queries or corpus (optional) becomes --date
(default: today, UTC); options after --config override the file. Exits 0 only
on success; the last line on stdout is one JSON record: status, date, output,
pairs, queries, seconds, already_done (and error on failure). See
rstar_batch/nightly.py and rstar_batch/score_corpus.py.
"""

import sys

from rstar_batch import nightly

if __name__ == "__main__":
    sys.exit(nightly.entrypoint(sys.argv[1:], job="score-corpus"))
