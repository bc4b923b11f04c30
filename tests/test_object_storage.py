"""Object storage: input, output and checkpoints on S3, against a real S3 API on 127.0.0.1.

moto's server stands in for S3. The jobs run as CLI processes that get the
endpoint and credentials only from the standard environment variables, as a
job on a cluster would (AWS_ENDPOINT_URL is how MinIO and other S3-compatible
stores are reached too).
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

import rstar_batch
from rstar_batch.config import ConfigError
from rstar_batch.io.sources import InputError
from rstar_batch.testing import make_candidates
from tests.jobs import S3_SECRET as SECRET
from tests.jobs import Job, committed_rows, paced, run
from tests.reference import reference_scores
from tests.test_rerank_job import _assert_matches_reference


pytestmark = pytest.mark.slow
QUERIES, CANDIDATES = 20, 30
TOTAL = QUERIES * CANDIDATES
MAX_LENGTH = 96
BUCKET = "rstar-test"


@pytest.fixture(scope="module")
def s3(s3_env):
    """The test's own client; no listings cache, so it sees what the jobs write."""
    return s3fs.S3FileSystem(
        key=s3_env["AWS_ACCESS_KEY_ID"], secret=s3_env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3_env["AWS_ENDPOINT_URL"], skip_instance_cache=True,
        use_listings_cache=False)


@pytest.fixture(scope="module")
def candidates(s3) -> pa.Table:
    """20 queries × 30 candidates in two Parquet objects under s3://rstar-test/candidates/."""
    table = make_candidates(QUERIES, CANDIDATES, seed=5)
    s3.mkdir(BUCKET)
    half = table.num_rows // 2
    for i, part in enumerate([table.slice(0, half), table.slice(half)]):
        pq.write_table(part, f"{BUCKET}/candidates/part-{i:05d}.parquet", filesystem=s3)
    return table


def _args(output: str, model: str, *extra: str) -> list[str]:
    return ["rerank", "--candidates", f"s3://{BUCKET}/candidates/*.parquet", "--output", output,
            "--model", model, "--dtype", "float32", "--max-length", str(MAX_LENGTH),
            "--checkpoint-rows", "60", "--replica-batch-rows", "60", "--rank-partitions", "4",
            "--commit-seconds", "1",
            *extra]


def _read_output(s3, prefix: str) -> pa.Table:
    return pq.read_table(f"{BUCKET}/{prefix}", filesystem=s3)


def _assert_each_query_in_one_file(s3, prefix: str) -> None:
    files = {}
    for path in s3.glob(f"{BUCKET}/{prefix}/part-*.parquet"):
        for qid in set(pq.read_table(path, filesystem=s3)["query_id"].to_pylist()):
            assert files.setdefault(qid, path) == path


def test_a_job_on_s3_killed_then_resumed_equals_the_one_pair_reference(
        s3_env, cluster, s3, candidates, micro_model, tmp_path):
    """S3 to S3: a job SIGKILLed half way, its status, then the rerun that resumes it.
    The output equals the one-pair reference, each pair once; the manifest names the
    input objects with their ETags; progress is removed on success; no log, status or
    JSON object holds the secret key. With a score cache on S3: the next night reuses
    every score, and the cache compacts there."""
    out = f"s3://{BUCKET}/resumed/"
    cache = ("--score-cache", f"s3://{BUCKET}/cache/")
    logs = []
    # paced by the fault hook (each replica batch 0.5 s longer) so there is time to kill
    job = Job(_args(out, micro_model, *cache), str(tmp_path / "run1.log"),
              env={**s3_env, **paced(0.5)}, cluster=cluster)
    committed = lambda: committed_rows(f"{BUCKET}/resumed", s3.glob, s3.cat_file)  # noqa: E731
    job.wait_until(lambda: committed() >= TOTAL // 2, timeout=240)
    job.kill()
    logs.append(job.output())
    assert not s3.exists(f"{BUCKET}/resumed/_SUCCESS")
    done_at_kill = committed()

    status = run(["status", out], str(tmp_path / "status1.log"), env=s3_env).output()
    # "last commit … ago" needs the commits' times, which S3 gives only in its listings.
    assert f"/{TOTAL} pairs scored" in status and "rerun the same command" in status

    rerun = run(_args(out, micro_model, *cache), str(tmp_path / "run2.log"), env=s3_env,
                cluster=cluster)
    logs.append(rerun.output())
    assert rerun.proc.returncode == 0, rerun.output()[-3000:]
    assert "resuming run 2" in rerun.output()
    assert f"{QUERIES} queries, {TOTAL} scored, 0 rejected" in rerun.output()
    table = _read_output(s3, "resumed")
    assert table.num_rows == len(set(zip(table["query_id"].to_pylist(),
                                         table["doc_id"].to_pylist()))) == TOTAL
    reference = reference_scores(micro_model, candidates, MAX_LENGTH)
    assert len(reference) == TOTAL
    _assert_matches_reference(table.to_pylist(), reference)
    _assert_each_query_in_one_file(s3, "resumed")
    manifest = s3.cat(f"{BUCKET}/resumed/_manifest.json").decode()
    per_run = {int(k): v for k, v in json.loads(manifest)["pairs_scored_per_run"].items()}
    assert per_run[1] == done_at_kill  # nothing committed was lost
    assert TOTAL <= per_run[1] + per_run[2] and per_run[2] <= TOTAL - done_at_kill + 60
    plan = json.loads(manifest)
    assert plan["summary"]["scored"] == TOTAL
    assert [f[0] for f in plan["plan"]["input"]["files"]] == [
        f"{BUCKET}/candidates/part-00000.parquet", f"{BUCKET}/candidates/part-00001.parquet"]
    assert all(isinstance(f[2], str) for f in plan["plan"]["input"]["files"])  # ETags
    assert s3.exists(f"{BUCKET}/resumed/_SUCCESS")
    assert not s3.exists(f"{BUCKET}/resumed/_work")  # progress removed on success

    done = run(["status", out], str(tmp_path / "status2.log"), env=s3_env).output()
    assert done.splitlines()[-1].startswith(f"DONE {TOTAL} pairs, {QUERIES} queries")
    for text in [*logs, status, done, manifest]:
        assert SECRET not in text
    assert all(SECRET not in s3.cat(p).decode() for p in s3.find(f"{BUCKET}/resumed")
               if p.endswith(".json"))

    night = run(_args(f"s3://{BUCKET}/night2/", micro_model, *cache),
                str(tmp_path / "night2.log"), env=s3_env, cluster=cluster)
    assert night.proc.returncode == 0, night.output()[-3000:]
    assert f"{TOTAL} scored ({TOTAL} from the score cache)" in night.output()
    key = [("query_id", "ascending"), ("doc_id", "ascending")]
    assert _read_output(s3, "night2").sort_by(key).equals(table.sort_by(key))
    compacted = run(["cache", "compact", cache[1]], str(tmp_path / "compact.log"), env=s3_env)
    assert compacted.proc.returncode == 0, compacted.output()
    assert f"2 record(s), {2 * TOTAL} entries → 1 record(s), {TOTAL} entries" in \
        compacted.output()
    assert SECRET not in night.output() + compacted.output()


def test_credentials_stay_out_of_errors(s3_env, s3, micro_model, tmp_path, monkeypatch,
                                        caplog):
    """(Out of logs, manifests and status: the job above.)"""
    # A wrong output bucket: one line naming it, no traceback, no secret, even at DEBUG.
    wrong = run(["--log-level", "DEBUG", *_args("s3://no-such-bucket-rstar/out/", micro_model)],
                str(tmp_path / "wrong.log"), env=s3_env)
    assert wrong.proc.returncode == 2
    assert ("error: cannot write to output 's3://no-such-bucket-rstar/out/': The specified "
            "bucket does not exist; check the bucket name") in wrong.output()
    assert SECRET not in wrong.output() and "Traceback" not in wrong.output()
    assert "no-such-bucket-rstar" not in s3.ls("")  # not created either

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InputError, match="'s3://no-such-bucket-rstar/c/' does not exist") as err:
        rstar_batch.rerank(candidates=["s3://no-such-bucket-rstar/c/"], output=str(tmp_path / "o"),
                           model=micro_model)
    assert SECRET not in str(err.value)
    # Credentials written into a URI are refused without being repeated.
    in_uri = f"s3://rstar-test-key:{SECRET}@{BUCKET}/candidates/"
    with pytest.raises(ConfigError, match=r"'s3://\*\*\*@rstar-test/candidates/' has "
                                          "credentials in it") as err:
        rstar_batch.rerank(candidates=[in_uri], output=str(tmp_path / "o"), model=micro_model)
    assert SECRET not in str(err.value) and SECRET not in caplog.text
