"""What a rerank job costs on object storage: wall time and S3 requests, by kind.

    python benchmarks/object_storage.py --smoke          # 2,000 pairs, local + s3; for CI
    python benchmarks/object_storage.py --pairs 200000 --runs local,s3,s3-latency \\
        --latency-ms 50 --workdir /tmp/osbench --report /tmp/osbench/report.json

A local S3 (moto's server on 127.0.0.1) stands behind a small recording proxy of
this file's own; the jobs reach S3 only through the proxy (AWS_ENDPOINT_URL), which
can add a fixed latency to every request, as a remote store would. Each run is
`rstar-batch rerank` as its own process, exactly as a user starts it, with the micro
model (testing.MICRO_ARCHITECTURE: R*'s tokenizer, a one-layer BERT), so scoring is
cheap and what is timed is the job's own I/O and bookkeeping:
  - local:      input and output in folders under --workdir;
  - s3:         input and output on S3, through the proxy;
  - s3-latency: the same with --latency-ms added to every request;
  - s3-cache-fill, s3-cached: s3 with --score-cache on S3 (area `cache`): the first
    fills an empty cache (every pair a miss), the second finds every pair in it.
Each request is classified by S3 operation (GET, ranged GET, PUT, HEAD, DELETE,
POST, LIST) and by key: the output's `_work/` (progress), the rest of the output,
the input. The report counts them per run, per million pairs and per job phase,
checks that the S3 output equals the local one, and is printed as markdown and
written as JSON (--report). The phases' bounds come from the job's _manifest.json
(seconds_by_phase, counted back from its `finished` time); each S3 run's requests
are kept in WORKDIR/RUN-requests.jsonl, times in seconds from the job's launch.
More job flags: --job-args='--checkpoint-rows 4096'. Every process and server it
starts is stopped at exit, on failure and SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from restart import kill_session  # noqa: E402
from run import machine  # noqa: E402

from rstar_batch.model import cpu_flags  # noqa: E402
from rstar_batch.testing import MICRO_ARCHITECTURE, make_candidates, make_tiny_model  # noqa: E402

log = logging.getLogger("object_storage")

BUCKET = "bench"
INPUT_PREFIX = "candidates/"
CACHE_PREFIX = "cache/"
PER_QUERY = 100
OPERATIONS = ("GET", "GET-range", "PUT", "HEAD", "DELETE", "POST", "LIST")
JOB_FLAGS = ["--rank-partitions", "50", "--dtype", "float32"]
SCORE_TOLERANCE = 1e-5
# not forwarded either way: they describe one hop, and the proxy buffers each body
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "te", "trailer",
                "upgrade", "proxy-connection", "proxy-authorization", "content-length"}
_DELETE_KEY = re.compile(rb"<Key>([^<]*)</Key>")


# ---------------------------------------------------------------- the recording proxy

class _Forward(BaseHTTPRequestHandler):
    """One client connection: each request is delayed, forwarded to S3 and recorded."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients expect
    server: "RecordingProxy"

    def handle_one(self) -> None:
        received = time.time()
        body = self._read_body()
        if self.server.latency:
            time.sleep(self.server.latency)
        try:
            status, reason, headers, payload = self._forward(body)
        except OSError as exc:
            status, reason, headers, payload = 502, "Bad Gateway", [], str(exc).encode()
        self._reply(status, reason, headers, payload)
        self.server.record(received, self.command, self.path, self.headers, body, status,
                           len(payload))

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = handle_one

    def _read_body(self) -> bytes:
        """The request body, whether sent with Content-Length or chunked."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list, bytes]:
        """Send the request as received (headers in order, same path) to S3."""
        host, port = self.server.upstream
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_HEADERS:
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            conn.close()

    def _reply(self, status: int, reason: str, headers: list, payload: bytes) -> None:
        self.send_response_only(status, reason)
        length = str(len(payload))
        for name, value in headers:
            if name.lower() == "content-length" and self.command == "HEAD":
                length = value  # a HEAD's length is the object's, with no body sent
            elif name.lower() not in _HOP_HEADERS:
                self.send_header(name, value)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
        pass  # every request is recorded instead


class RecordingProxy(ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of `upstream` that records every request."""

    daemon_threads = True
    request_queue_size = 256  # many Ray workers open connections at once

    def __init__(self, upstream: tuple[str, int], latency_ms: float = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream, self.latency = upstream, latency_ms / 1000
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self, received: float, method: str, target: str, headers, body: bytes,
               status: int, sent: int) -> None:
        """Keep what classifying the request needs; DeleteObjects' first key too."""
        split = urlsplit(target)
        entry = {"t": received, "method": method, "path": split.path, "query": split.query,
                 "range": "Range" in headers, "status": status,
                 "bytes_in": len(body), "bytes_out": sent}
        if method == "POST" and "delete" in parse_qs(split.query, keep_blank_values=True):
            keys = _DELETE_KEY.findall(body)
            entry["deleted"] = [k.decode() for k in keys]
        with self._lock:
            self.records.append(entry)

    def mark(self) -> int:
        """How many requests so far: a run's requests are those between two marks."""
        with self._lock:
            return len(self.records)

    def __enter__(self) -> "RecordingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)


# ------------------------------------------------------------------ classifying requests

def classify(entry: dict, output_key: str) -> tuple[str, str, str]:
    """(operation, area, key) of a recorded request; `output_key` is e.g. 'out-s3/'."""
    parts = unquote(entry["path"]).lstrip("/").split("/", 1)
    key = parts[1] if len(parts) > 1 else ""
    query = parse_qs(entry["query"], keep_blank_values=True)
    method = entry["method"]
    if method == "GET" and not key and not ({"location", "versioning", "acl", "policy",
                                             "tagging", "uploads"} & set(query)):
        operation, key = "LIST", query.get("prefix", [""])[0]
    elif method == "GET":
        operation = "GET-range" if entry["range"] else "GET"
    else:
        operation = method
    if entry.get("deleted"):
        key = entry["deleted"][0]
    return operation, _area(key, output_key), key


def _area(key: str, output_key: str) -> str:
    work = output_key + "_work"
    if key == work or key.startswith(work + "/"):
        return "_work"
    if key == output_key.rstrip("/") or key.startswith(output_key):
        return "output"
    if key.startswith(INPUT_PREFIX.rstrip("/")):
        return "input"
    if key.startswith(CACHE_PREFIX):
        return "cache"
    return "bucket"


def phase_bounds(manifest: dict) -> tuple[float, float]:
    """(start, end) of the scoring phase in wall-clock time, from the manifest: its
    phases are consecutive and end with the rank pass, just before it was written."""
    phases = manifest.get("seconds_by_phase", {})
    scoring_end = manifest["finished"] - phases.get("rank", 0.0)
    return scoring_end - phases.get("scoring", 0.0), scoring_end


def count_requests(records: list[dict], output_key: str, pairs: int,
                   scoring: Optional[tuple[float, float]]) -> dict:
    """A run's requests by operation (all, `_work/`), by area, per million pairs and
    per phase (before, during and after scoring)."""
    by_op, work_op, by_area, by_phase, work_phase = (Counter() for _ in range(5))
    work_puts: set[str] = set()
    for entry in records:
        operation, area, key = classify(entry, output_key)
        phase = _phase(entry["t"], scoring)
        by_op[operation] += 1
        by_area[area] += 1
        by_phase[phase] += 1
        if area == "_work":
            work_op[operation] += 1
            work_phase[phase] += 1
            if operation == "PUT":
                work_puts.add(key)
    per_million = 1e6 / max(1, pairs)
    return {
        "total": len(records), "by_operation": dict(by_op), "work": sum(work_op.values()),
        "work_by_operation": dict(work_op), "by_area": dict(by_area),
        "by_phase": dict(by_phase), "work_by_phase": dict(work_phase),
        "errors": sum(1 for e in records if e["status"] >= 400),
        "bytes_in": sum(e["bytes_in"] for e in records),
        "bytes_out": sum(e["bytes_out"] for e in records),
        "per_million_pairs": {
            "requests": len(records) * per_million,
            "work_requests": sum(work_op.values()) * per_million,
            "puts": by_op["PUT"] * per_million, "work_puts": work_op["PUT"] * per_million,
            "work_distinct_keys_put": len(work_puts) * per_million},
        "work_distinct_keys_put": len(work_puts),
    }


def _phase(t: float, scoring: Optional[tuple[float, float]]) -> str:
    if scoring is None:
        return "unknown"
    return "before" if t < scoring[0] else "scoring" if t <= scoring[1] else "after"


# ------------------------------------------------------------------- S3, data and model

@contextlib.contextmanager
def local_s3(workdir: str) -> Iterator[tuple[str, dict]]:
    """moto's S3 server on a free port of 127.0.0.1: (host:port, the jobs' AWS env)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        nowhere = os.path.join(workdir, "no-aws-config")  # no ~/.aws settings leak in
        yield f"{host}:{port}", {
            "AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": nowhere,
            "AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        server.stop()


def s3_client(endpoint: str, env: dict):
    """This script's own client, straight to moto (not through the proxy, not counted)."""
    import s3fs

    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=f"http://{endpoint}", skip_instance_cache=True,
                             use_listings_cache=False)


def write_candidates(workdir: str, pairs: int, files: int, seed: int = 7) -> str:
    """`pairs` candidates, PER_QUERY per query, in `files` Parquet parts (kept for reruns)."""
    folder = os.path.join(workdir, f"candidates-{pairs}-{files}")
    if not os.path.isdir(folder):
        per_query = min(PER_QUERY, pairs)
        table = make_candidates(max(1, pairs // per_query), per_query, seed=seed)
        partial = folder + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        step = -(-table.num_rows // files)
        for i in range(files):
            pq.write_table(table.slice(i * step, step),
                           os.path.join(partial, f"part-{i:05d}.parquet"))
        os.rename(partial, folder)
    return folder


def upload(s3, folder: str) -> str:
    """Copy the candidate parts to s3://bench/candidates/; return that URI."""
    if not s3.exists(BUCKET):
        s3.mkdir(BUCKET)
    for name in sorted(os.listdir(folder)):
        s3.put_file(os.path.join(folder, name), f"{BUCKET}/{INPUT_PREFIX}{name}")
    return f"s3://{BUCKET}/{INPUT_PREFIX}"


# ------------------------------------------------------------------------------ the jobs

def run_job(name: str, candidates: str, output: str, model: str, extra: list[str],
            env: dict, workdir: str, timeout: float) -> dict:
    """`rstar-batch rerank` as its own process (and session): wall seconds, manifest
    phases. Whatever is left of its session is killed afterwards, even on failure."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    command = [sys.executable, "-m", "rstar_batch", "rerank", "--candidates", candidates,
               "--output", output, "--model", model, *JOB_FLAGS, *extra]
    job_log = os.path.join(workdir, f"{name}.log")
    log.info("run %s: %s (log: %s)", name, " ".join(command), job_log)
    started_at, started = time.time(), time.perf_counter()
    with open(job_log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**base, **env}, cwd=workdir)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        kill_session(process.pid)
        process.wait()
    seconds = time.perf_counter() - started
    if code != 0:
        tail = open(job_log).read()[-3000:]
        raise SystemExit(f"run {name}: the job {'timed out' if code is None else f'exited {code}'}"
                         f" after {seconds:.0f} s; its log ends:\n{tail}")
    return {"command": command, "seconds": seconds, "started_at": started_at, "log": job_log}


def read_manifest(output: str, s3) -> dict:
    if output.startswith("s3://"):
        return json.loads(s3.cat(f"{output[5:].rstrip('/')}/_manifest.json"))
    return json.load(open(os.path.join(output, "_manifest.json")))


def read_output(output: str, s3) -> pa.Table:
    """The ranked rows, sorted by (query_id, doc_id) for comparing two outputs."""
    columns = ["query_id", "doc_id", "score", "rank"]
    if output.startswith("s3://"):
        table = pq.read_table(output[5:].rstrip("/"), filesystem=s3, columns=columns)
    else:
        table = pq.read_table(output, columns=columns)
    return table.sort_by([("query_id", "ascending"), ("doc_id", "ascending")])


def check_output(table: pa.Table, pairs: int,
                 reference: Optional[pa.Table]) -> dict:
    """Row count equal to the input's; ids, ranks and scores equal to the reference's
    (ranks up to swaps of scores tied within SCORE_TOLERANCE)."""
    problems, swaps = [], 0
    if table.num_rows != pairs:
        problems.append(f"{table.num_rows} rows, expected {pairs}")
    if reference is not None and table.num_rows == reference.num_rows:
        for column in ("query_id", "doc_id"):
            if not table[column].equals(reference[column]):
                problems.append(f"column {column} differs from the local output")
        diff = pc.max(pc.abs(pc.subtract(table["score"], reference["score"]))).as_py() or 0.0
        if diff > SCORE_TOLERANCE:
            problems.append(f"scores differ from the local output by up to {diff:.2e}")
        if not problems:
            swaps, far = _rank_swaps(table, reference)
            if far:
                problems.append(f"{far} ranks differ from the local output beyond score ties")
    elif reference is not None:
        problems.append("row count differs from the local output")
    return {"rows": table.num_rows, "ok": not problems, "problems": problems,
            "rank_swaps_within_tolerance": swaps}


def _rank_swaps(table: pa.Table, reference: pa.Table) -> tuple[int, int]:
    """(rows ranked differently between near-tied scores, rows ranked differently
    otherwise). A pair's float32 score may differ by an ulp with the batch it was
    scored in, so two scores tied in one run may be ordered the other way in another."""
    differ = pc.not_equal(table["rank"], reference["rank"])
    if not pc.any(differ).as_py():
        return 0, 0
    ours, theirs = table.filter(differ), reference.filter(differ)
    queries = reference.filter(pc.is_in(reference["query_id"], ours["query_id"].unique()))
    score_at = {(q, r): s for q, r, s in zip(*(queries[c].to_pylist()
                                                for c in ("query_id", "rank", "score")))}
    far = sum(1 for q, r, s in zip(ours["query_id"].to_pylist(), ours["rank"].to_pylist(),
                                   theirs["score"].to_pylist())
              if abs(score_at[(q, r)] - s) > SCORE_TOLERANCE)
    return ours.num_rows - far, far


# ------------------------------------------------------------------------------- report

def heading(args: argparse.Namespace) -> str:
    flags = cpu_flags()
    units = ", ".join(f"{f} {'yes' if f in flags else 'no'}"
                      for f in ("avx2", "avx512f", "amx_bf16"))
    return (f"## Object storage: {args.pairs:,} pairs, micro model, "
            f"{' '.join(JOB_FLAGS + shlex.split(args.job_args))}\n\n"
            f"Machine: {machine('cpu')} ({units}); {os.cpu_count()} logical CPUs. "
            f"S3: moto {_moto_version()} on 127.0.0.1 behind a recording proxy"
            f"{f', +{args.latency_ms:g} ms per request in s3-latency' if args.latency_ms else ''}.")


def _moto_version() -> str:
    import moto

    return moto.__version__


def markdown(runs: dict) -> str:
    """The report's tables: time, requests by operation, per million pairs, by phase."""
    local = runs.get("local", {}).get("seconds")
    lines = ["| run | pairs | wall s | pairs/s | × local wall | startup s | scoring s | rank s "
             "| output ok |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in runs.items():
        ph = r.get("phases", {})
        ratio = f"{r['seconds'] / local:.2f}" if local else "-"
        lines.append(f"| {name} | {r['pairs']:,} | {r['seconds']:.1f} | "
                     f"{r['pairs'] / r['seconds']:,.0f} | {ratio} | {ph.get('startup', 0):.1f} "
                     f"| {ph.get('scoring', 0):.1f} | {ph.get('rank', 0):.1f} | "
                     f"{_verdict(r['check'])} |")
    s3_runs = {n: r["requests"] for n, r in runs.items() if "requests" in r}
    if s3_runs:
        lines += ["", _operations_table(s3_runs), "", _per_million_table(s3_runs), "",
                  _phase_table(s3_runs)]
    return "\n".join(lines)


def _verdict(check: dict) -> str:
    if not check["ok"]:
        return "; ".join(check["problems"])
    swaps = check["rank_swaps_within_tolerance"]
    return f"yes ({swaps} ranks swapped between scores within 1e-5)" if swaps else "yes"


def _operations_table(s3_runs: dict) -> str:
    lines = [f"| run | keys | all | {' | '.join(OPERATIONS)} |",
             "|---|---|---:|" + "---:|" * len(OPERATIONS)]
    for name, q in s3_runs.items():
        for label, total, ops in (("all", q["total"], q["by_operation"]),
                                  ("_work/", q["work"], q["work_by_operation"])):
            lines.append(f"| {name} | {label} | {total:,} | "
                         + " | ".join(f"{ops.get(o, 0):,}" for o in OPERATIONS) + " |")
    return "\n".join(lines)


def _per_million_table(s3_runs: dict) -> str:
    lines = ["| run | requests/M pairs | _work/ requests/M | PUTs/M | _work/ PUTs/M "
             "| distinct _work/ keys PUT/M | input reqs | output reqs (not _work/) | MB up | "
             "MB down | status ≥ 400 |", "|---|" + "---:|" * 10]
    for name, q in s3_runs.items():
        m, area = q["per_million_pairs"], q["by_area"]
        lines.append(f"| {name} | {m['requests']:,.0f} | {m['work_requests']:,.0f} | "
                     f"{m['puts']:,.0f} | {m['work_puts']:,.0f} | "
                     f"{m['work_distinct_keys_put']:,.0f} | {area.get('input', 0):,} | "
                     f"{area.get('output', 0):,} | {q['bytes_in'] / 1e6:,.1f} | "
                     f"{q['bytes_out'] / 1e6:,.1f} | {q['errors']:,} |")
    return "\n".join(lines)


def _phase_table(s3_runs: dict) -> str:
    lines = ["| run | before scoring (all / _work/) | scoring (all / _work/) "
             "| after scoring: rank + finish (all / _work/) |", "|---|---:|---:|---:|"]
    for name, q in s3_runs.items():
        cells = [f"{q['by_phase'].get(p, 0):,} / {q['work_by_phase'].get(p, 0):,}"
                 for p in ("before", "scoring", "after")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200_000,
                        help=f"Candidate pairs, {PER_QUERY} per query (default: 200000)")
    parser.add_argument("--files", type=int, default=4, help="Input Parquet parts (default: 4)")
    parser.add_argument("--latency-ms", type=float, default=0,
                        help="Delay added to every request of the s3-latency run (default: 0)")
    parser.add_argument("--runs", default="local,s3",
                        help="Comma-separated runs: local, s3, s3-latency (default: local,s3)")
    parser.add_argument("--workdir", default=None,
                        help="Data, model, local outputs and logs (default: a temporary folder)")
    parser.add_argument("--report", default=None, help="Write the report as JSON here")
    parser.add_argument("--job-args", default="",
                        help="More flags for every job, one string: --job-args='--flag 1'")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds per job")
    parser.add_argument("--smoke", action="store_true",
                        help="2,000 pairs in 2 files, local + s3, no latency: for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.files, args.runs, args.latency_ms = 2000, 2, "local,s3", 0
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(args.runs) - {"local", "s3", "s3-latency", "s3-cache-fill", "s3-cached"}
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from local, s3, s3-latency, "
                     "s3-cache-fill, s3-cached")
    return args


def run_all(args: argparse.Namespace, workdir: str) -> dict:
    """Each asked-for run in turn, S3 behind a fresh proxy per run; the runs' results."""
    model = make_tiny_model(os.path.join(workdir, "model-micro"),
                            architecture=MICRO_ARCHITECTURE)
    folder = write_candidates(workdir, args.pairs, args.files)
    pairs = pq.ParquetDataset(folder).read(columns=["query_id"]).num_rows
    extra, runs, reference = shlex.split(args.job_args), {}, None
    with local_s3(workdir) as (endpoint, aws_env):
        s3 = s3_client(endpoint, aws_env)
        s3_input = upload(s3, folder) if any(r != "local" for r in args.runs) else None
        for name in args.runs:
            if name == "local":
                result = _local_run(folder, model, extra, workdir, args.timeout)
            else:
                latency = args.latency_ms if name == "s3-latency" else 0
                result = _s3_run(name, s3_input, model, extra, endpoint, aws_env, latency,
                                 workdir, args.timeout, pairs, s3)
            result["pairs"] = pairs
            table = read_output(result["output"], s3)
            result["check"] = check_output(table, pairs, reference)
            if name == "local":
                reference = table
            runs[name] = result
            log.info("run %s: %.1f s, output %s", name, result["seconds"],
                     "ok" if result["check"]["ok"] else result["check"]["problems"])
    return runs


def _local_run(folder: str, model: str, extra: list[str], workdir: str,
               timeout: float) -> dict:
    output = os.path.join(workdir, "out-local")
    shutil.rmtree(output, ignore_errors=True)
    result = run_job("local", folder, output, model, extra, {}, workdir, timeout)
    result.update(output=output, phases=read_manifest(output, None).get("seconds_by_phase", {}))
    return result


def _s3_run(name: str, s3_input: str, model: str, extra: list[str], endpoint: str,
            aws_env: dict, latency_ms: float, workdir: str, timeout: float, pairs: int,
            s3) -> dict:
    """One job on S3 through a recording proxy; its requests are kept as JSON lines."""
    host, port = endpoint.rsplit(":", 1)
    output_key = f"out-{name}/"
    output = f"s3://{BUCKET}/{output_key}"
    if name.startswith("s3-cache"):
        extra = [*extra, "--score-cache", f"s3://{BUCKET}/{CACHE_PREFIX}"]
    with RecordingProxy((host, int(port)), latency_ms) as proxy:
        result = run_job(name, s3_input, output, model, extra,
                         {**aws_env, "AWS_ENDPOINT_URL": proxy.url}, workdir, timeout)
        records = list(proxy.records)
    manifest = read_manifest(output, s3)
    with open(os.path.join(workdir, f"{name}-requests.jsonl"), "w") as out:
        for entry in records:
            operation, area, key = classify(entry, output_key)
            out.write(json.dumps({**entry, "t": round(entry["t"] - result["started_at"], 4),
                                  "operation": operation, "area": area, "key": key}) + "\n")
    result.update(output=output, latency_ms=latency_ms,
                  phases=manifest.get("seconds_by_phase", {}),
                  requests=count_requests(records, output_key, pairs, phase_bounds(manifest)))
    return result


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` stops what it started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    _stop_on_sigterm()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = os.path.abspath(args.workdir)
            os.makedirs(workdir, exist_ok=True)
        else:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="osbench-"))
        runs = run_all(args, workdir)
    title = heading(args)
    print(f"{title}\n\n{markdown(runs)}")
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as out:
            json.dump({"heading": title, "pairs": args.pairs, "latency_ms": args.latency_ms,
                       "job_flags": JOB_FLAGS + shlex.split(args.job_args), "runs": runs},
                      out, indent=2)
    failed = [n for n, r in runs.items() if not r["check"]["ok"]]
    if failed:
        print(f"output check failed for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
