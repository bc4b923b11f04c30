"""Processes a test can SIGKILL, Ray and all: the CLI as a job, and local Ray clusters."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Iterator, Optional

import pyarrow as pa

from rstar_batch.base.cores import usable_cores
from rstar_batch.cluster import CORES_LABEL, EMBEDDED_EXTRA_CPUS
from rstar_batch.faults import FAULT_ENV


def _live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process that is not a zombie."""
    table = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(stat.split("/")[2])] = (int(fields[1]), int(fields[3]))
    return table


def session_pids(sid: int) -> list[int]:
    """Live processes of a session (the job's driver and every Ray process it started)."""
    return [pid for pid, (_, s) in _live_processes().items() if s == sid]


def job_pids(sid: int) -> Callable[[], list[int]]:
    """A finder of a job's live processes: its session's, and those of the sessions
    its processes started (a job that starts its own Ray runs it in a watched child of
    its own session, rstar_batch/supervise.py), remembered once seen, so that they are
    found after their parent is gone."""
    sessions = {sid}

    def find() -> list[int]:
        table = _live_processes()
        sessions.update(table[pid][1] for pid in tree_pids(sessions) if pid in table)
        return [pid for pid, (_, s) in table.items() if s in sessions]

    return find


def tree_pids(sids: Iterable[int]) -> list[int]:
    """Live processes of the sessions and all their descendants.

    Ray's job supervisor starts each job's driver in a session of its own, so a
    cluster's processes are its nodes' sessions plus what those spawned.
    """
    table = _live_processes()
    sids = set(sids)
    found = {pid for pid, (_, sid) in table.items() if sid in sids}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def kill_until_gone(find: Callable[[], list[int]], what: str, timeout: float = 60) -> None:
    """SIGKILL whatever `find` returns until it returns nothing."""
    deadline = time.monotonic() + timeout
    while pids := find():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: processes {pids} survive")
        time.sleep(0.1)


class Job:
    """`python -m rstar_batch ARGS` (or an entrypoint of jobs/) in its own session, with
    its log in a file."""

    def __init__(self, args: list[str], log: str, env: Optional[dict] = None,
                 cores: Optional[set[int]] = None,
                 cluster: Optional["LocalCluster"] = None,
                 script: Optional[str] = None) -> None:
        """`cores`: pin the job (and the Ray it starts) to these CPUs, as taskset does.
        `cluster`: join it (`--address`) instead of starting a Ray of its own.
        `script`: run this entrypoint (jobs/) with `args` instead of the CLI."""
        self.log = log
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        if cluster is not None:
            joins = {"RAY_ADDRESS": cluster.address} if script else {}
            args = args if script else [*args, "--address", cluster.address]
            env = {**cluster.job_env, **joins, **(env or {})}
        command = [script] if script else ["-m", "rstar_batch"]
        self.proc = subprocess.Popen([sys.executable, *command, *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**base, **(env or {})},
                                     preexec_fn=None if cores is None else (
                                         lambda: os.sched_setaffinity(0, cores)))
        self.pids = job_pids(self.proc.pid)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def output(self) -> str:
        return open(self.log).read()

    def wait_until(self, condition: Callable[[], bool], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended before the kill point:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("kill point not reached in time")
            time.sleep(0.05)

    def terminate(self, timeout: float = 60, group: bool = False,
                  sig: int = signal.SIGTERM, every: bool = False) -> float:
        """SIGTERM (or `sig`: SIGINT is Ctrl-C) the driver alone (as Kubernetes and
        `ray job stop` do), with `group` its process group (`kill -- -PGID`, Slurm's
        scancel), or with `every` every process of the job, a watched driver's and its
        embedded Ray's too (systemd stopping a unit: its cgroup); return the seconds
        until it exited. Whatever of its session survives is then killed."""
        sent = time.monotonic()
        if every:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        elif group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()
        return time.monotonic() - sent

    def kill(self) -> None:
        """SIGKILL the driver and every process of its session; wait until none is left."""
        kill_until_gone(self.pids, "the killed job")
        self.proc.wait()


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (a watcher's: the driver it runs)."""
    return [child for child, (ppid, _) in _live_processes().items() if ppid == pid]


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` handles `sig` yet (its SigCgt mask)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            mask = next(line.split()[1] for line in fh if line.startswith("SigCgt:"))
    except (FileNotFoundError, StopIteration):
        return False
    return bool(int(mask, 16) >> (sig - 1) & 1)


def paced(seconds: float) -> dict[str, str]:
    """The environment that makes each replica Score call sleep `seconds` first, so
    that a test that stops a job part way lands inside scoring on any machine. Ray
    workers read it from their node: a cluster's nodes need it too (`local_cluster`'s
    `env`), not only the driver."""
    return {FAULT_ENV: f"slow:{seconds:g}"}


def run(args: list[str], log: str, env: Optional[dict] = None, timeout: float = 300,
        cores: Optional[set[int]] = None, cluster: Optional["LocalCluster"] = None,
        script: Optional[str] = None) -> Job:
    job = Job(args, log, env, cores, cluster, script)
    job.wait(timeout)
    return job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def venv_bin(name: str) -> str:
    """A console script beside the Python running the tests (its venv's `ray`), else `name`
    as found on PATH."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


class LocalCluster:
    """Ray nodes started with `ray start`, each in its own session and temp dir.

    `dashboard=True` gives the head a dashboard (the job API) on a free port of
    127.0.0.1. `token` pins the cluster's auth token (RAY_AUTH_TOKEN) instead of
    ~/.ray/auth_token. The test's Python comes first on PATH, so `python` in a
    submitted job's entrypoint is the one with rstar_batch installed.
    """

    def __init__(self, base: str, dashboard: bool = False, token: Optional[str] = None,
                 env: Optional[dict] = None) -> None:
        self.base, self.sessions, self.port = base, {}, free_port()
        self.dashboard_port = free_port() if dashboard else None
        self.env = {**os.environ, "RAY_AUTH_MODE": "token",
                    "PATH": os.pathsep.join([os.path.dirname(sys.executable),
                                             os.environ.get("PATH", "")])}
        self.env.pop("RAY_ADDRESS", None)
        self.env.update(env or {})
        if token:
            self.env["RAY_AUTH_TOKEN"] = token

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def job_env(self) -> dict[str, str]:
        """What a job's driver needs to join: token auth, and this cluster's token."""
        return {k: self.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") if k in self.env}

    @property
    def dashboard_url(self) -> str:
        assert self.dashboard_port, "started without a dashboard"
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_args(self, name: str) -> list[str]:
        if name != "head":
            node = [f"--address={self.address}"]
        elif self.dashboard_port:
            node = ["--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}",
                    f"--ray-client-server-port={free_port()}"]
        else:
            return ["--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                    "--include-dashboard=false"]
        if self.dashboard_port:  # each node's agents need ports of their own on this host
            node += [f"--{flag}-port={free_port()}" for flag in (
                "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent",
                "metrics-export")]
        return node

    def start(self, name: str, *args: str) -> None:
        proc = subprocess.Popen(
            [venv_bin("ray"), "start", *self._node_args(name), f"--temp-dir={self.base}/{name}",
             "--disable-usage-stats", *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=self.env)
        output = proc.communicate(timeout=120)[0]
        self.sessions[name] = proc.pid
        assert proc.returncode == 0, output[-3000:]

    def raylet_of(self, name: str) -> int:
        for pid in session_pids(self.sessions[name]):
            try:
                if "/raylet/raylet" in open(f"/proc/{pid}/cmdline").read():
                    return pid
            except OSError:
                continue
        raise AssertionError(f"no raylet for node {name}")

    def leftovers(self) -> list[int]:
        """Live processes whose command line names this cluster's temp dir."""
        pids = []
        for pid in _live_processes():
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if self.base + "/" in cmdline:
                pids.append(pid)
        return pids

    def stop(self) -> None:
        """Kill every node and all they spawned: job drivers run in sessions of their own
        under the job's supervisor, so the process tree is followed too, and anything
        naming the temp dir (put a submitted job's files there) is killed as well."""
        mine = os.getpid()
        kill_until_gone(lambda: sorted((set(tree_pids(self.sessions.values()))
                                        | set(self.leftovers())) - {mine}), "ray cluster")


def worker_args(cpus: int, workers: int = 1) -> list[str]:
    """`ray start` options of a worker node with `cpus` logical CPUs and its share of
    this machine's cores."""
    cores = max(1, usable_cores() // workers)
    return [f"--num-cpus={cpus}", f"--labels={CORES_LABEL}={cores}"]


def new_token() -> str:
    """A fresh Ray auth token for one test cluster."""
    return secrets.token_hex(32)


def committed_rows(out: str, list_glob: Callable[[str], list[str]] = glob.glob,
                   read: Callable[[str], bytes] = lambda p: open(p, "rb").read()) -> int:
    """Input rows the job's commit records cover, overlaps counted once; `list_glob`
    and `read` reach another filesystem (e.g. s3fs's `glob` and `cat_file`). A record
    another one replaces (score-corpus's running top K) covers nothing more."""
    records = {}
    for path in list_glob(f"{out}/_work/commits/*.json"):
        try:
            records[path.rsplit("/", 1)[-1][:-5]] = json.loads(read(path))
        except (OSError, ValueError):
            continue  # replaced or removed meanwhile
    void = {r.get("replaces") for r in records.values()}
    rows: dict[int, set[int]] = {}
    for name, record in records.items():
        if name not in void:
            for chunk, start, end in record["ranges"]:
                rows.setdefault(chunk, set()).update(range(start, end))
    return sum(len(r) for r in rows.values())


@contextlib.contextmanager
def local_cluster(worker_cpus: int, dashboard: bool = False, token: Optional[str] = None,
                  workers: int = 1, env: Optional[dict] = None) -> Iterator[LocalCluster]:
    """A head that runs nothing (no CPUs, as on KubeRay) and `workers` worker nodes,
    torn down with every process they started, even when the test fails. The workers
    share this machine's cores out and say so in a label, so that CPU replicas run no
    more threads than there are cores. `env` is added to every node's environment."""
    base = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # Ray's socket paths must stay short
    cluster = LocalCluster(base, dashboard=dashboard, token=token, env=env)
    try:
        cluster.start("head", "--num-cpus=0")
        for n in range(1, workers + 1):
            cluster.start(f"worker{n}", *worker_args(worker_cpus, workers))
        yield cluster
    finally:
        cluster.stop()  # job drivers too: their command lines name files under base
        shutil.rmtree(base, ignore_errors=True)


S3_SECRET = "rstar-secret-" + secrets.token_hex(16)  # grepped for in everything jobs write


@contextlib.contextmanager
def moto_s3(folder: str) -> Iterator[dict[str, str]]:
    """An S3 API (moto's server) on a free port of 127.0.0.1, and the environment that
    reaches it with S3_SECRET as its secret key; `folder` stands in for ~/.aws."""
    import logging

    import moto.server as moto_server  # the test extra: a missing one fails, never skips

    werkzeug = logging.getLogger("werkzeug")  # one log line per request otherwise
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        nowhere = os.path.join(folder, "none")  # no ~/.aws settings leak in
        yield {"AWS_ACCESS_KEY_ID": "rstar-test-key", "AWS_SECRET_ACCESS_KEY": S3_SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
               "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere,
               "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        server.stop()
        werkzeug.setLevel(level)


@contextlib.contextmanager
def one_node_cluster(env: Optional[dict] = None) -> Iterator[LocalCluster]:
    """One node as the embedded Ray is (its logical CPUs and cores label), so jobs that
    join it plan as they would alone; for tests about the job, not about starting Ray.
    A job joins it in ~1 s where an embedded Ray takes ~8 s to start and stop. `env`
    is added to the node's environment (its workers': an object store's endpoint)."""
    base = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    cluster = LocalCluster(base, token=new_token(), env=env)
    cores = usable_cores()
    try:
        cluster.start("head", f"--num-cpus={cores + EMBEDDED_EXTRA_CPUS}",
                      f"--labels={CORES_LABEL}={cores}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def assert_same_ranking(got: pa.Table, want: pa.Table, rows: int) -> None:
    """`got` ranks the same (query_id, doc_id) pairs as `want`, each once, with scores
    within 1e-5; only near-ties (within 2e-5) may swap places."""
    mine = {(r["query_id"], r["doc_id"]): r for r in got.to_pylist()}
    theirs = {(r["query_id"], r["doc_id"]): r for r in want.to_pylist()}
    assert got.num_rows == len(mine) == rows  # no duplicates
    assert mine.keys() == theirs.keys()  # nothing lost
    by_rank = {(r["query_id"], r["rank"]): r for r in want.to_pylist()}
    for key, row in mine.items():
        assert abs(row["score"] - theirs[key]["score"]) <= 1e-5
        if row["rank"] != theirs[key]["rank"]:  # only a near-tie may swap places
            assert abs(by_rank[(row["query_id"], row["rank"])]["score"] - row["score"]) <= 2e-5
