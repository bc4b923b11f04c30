"""Where model replicas run, how many, with how many threads, and who feeds them.

The plan is made once, on the driver, from the nodes the cluster has when the job
starts: GPU replicas go one per GPU (or per fraction of one); CPU replicas take the
CPUs each node keeps after tokenizing and I/O, one torch thread per CPU reserved,
so that replicas Ray packs onto one node never run more threads than it has CPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence

import pyarrow as pa

from rstar_batch.cluster import Node, wait_at_most
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.io.scored import COMMITS
from rstar_batch.model import auto_cpu_dtype
from rstar_batch.progress.drain import StopSignal, stop_requested
from rstar_batch.stages.pairs import PassagePolicy


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
    """Where and how many model replicas run."""

    device: str
    num_gpus: float
    num_cpus: float  # logical CPUs each replica reserves
    min_size: int
    max_size: int
    tokenizers: int  # the most CPU tokenizer actors that feed them
    batch_rows: int  # rows (pairs) handed to a replica per call
    dtype: str = "auto"  # float32/bfloat16/float16; auto: each GPU replica picks
    dtype_reason: str = ""
    threads: int = 1  # torch threads of a CPU replica: its reserved CPUs
    placement_group: str = ""  # the named group CPU replicas are placed in, while held
    tokenizer_cpus: float = 1.0  # logical CPUs each tokenizer actor reserves


# Logical CPUs each node keeps from CPU replicas: one for a tokenizer actor, one for
# read, write and Ray Data's tasks. Tokenizing costs ~1/40 of scoring R* on a core
# (BENCHMARKS.md), so one tokenizer per node keeps its replicas fed.
NODE_RESERVE_CPUS = 2

# The tokenizer pool autoscales (one actor, more while blocks queue for them) up to
# a cap. A GPU replica aims at 100,000+ pairs/s, which takes a dozen cores of
# tokenizing. A CPU replica scoring R* needs a fraction of one, but a small model
# needs more than one core of tokenizing per replica (benchmarks/feed.py): the pool
# grows to two per replica only when the queue says so.
TOKENIZERS_PER_CPU_REPLICA = 2
TOKENIZERS_PER_GPU_REPLICA = 16

# Rows per replica call. Each block costs Ray a roughly fixed few tens of ms across
# the driver, the object store and the actors (benchmarks/feed.py: a job whose model
# costs ~30 µs per pair scored 1M pairs in 86 s with 2048-row blocks, 45 s with
# 32768). A GPU replica scores 32768 pairs in a fraction of a second; a CPU replica
# scoring R* takes ~20 s for 2048, and what a kill loses grows with the block.
CPU_BATCH_ROWS = 2048
GPU_BATCH_ROWS = 32768
# Rows per tokenizer call: small blocks keep the tokenizers' pipeline short (a 32768-row
# block of texts takes a core ~7 s to tokenize); a GPU replica's call bundles many of them.
TOKENIZER_BATCH_ROWS = 2048


def tokenizer_batch_rows(plan: "ReplicaPlan", passages_tokenized: bool) -> int:
    """Rows per tokenizer call. With passages already tokenized (a tokenized corpus) a
    tokenizer only tokenizes each block's few queries and assembles pairs, ~0.3 s for
    32768 rows, so its blocks are as large as a replica's call: every block costs Ray a
    fixed share (benchmarks/feed.py: 20% off the scoring phase of 1M id-only pairs)."""
    return plan.batch_rows if passages_tokenized else min(plan.batch_rows,
                                                          TOKENIZER_BATCH_ROWS)


def plan_replicas(config: RerankConfig, nodes: Sequence[Node]) -> ReplicaPlan:
    """Place replicas on GPUs when asked or when the cluster has any, else on CPUs;
    size the tokenizer pool to feed them (unless tokenize_workers says)."""
    gpus = sum(n.gpus for n in nodes)
    device = config.device if config.device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    if device == "cuda" and config.quantize == "int8":
        # config.py refuses int8 with --device cuda; here --device auto found GPUs
        raise ConfigError(f"quantize int8 is for float32 CPU replicas, but the cluster has "
                          f"{gpus:g} GPU(s), which --device auto uses: add --device cpu or "
                          "drop --quantize")
    if device == "cuda":
        default_max = max(1, int(gpus // config.gpus_per_replica))
        num_gpus, num_cpus, threads = config.gpus_per_replica, config.cpus_per_replica or 1.0, 1
    else:
        threads, default_max = cpu_replicas(config, nodes)
        num_gpus, num_cpus = 0.0, float(threads)
    max_size = config.max_replicas or max(default_max, config.min_replicas)
    # the CPUs the replicas leave, but one for reads and writes
    spare = int(sum(n.cpus for n in nodes) - max_size * num_cpus) - 1
    if config.tokenize_workers:
        tokenizers = config.tokenize_workers
    elif device == "cuda":
        tokenizers = max(2, min(spare, TOKENIZERS_PER_GPU_REPLICA * max_size))
    else:
        tokenizers = max(1, min(spare, TOKENIZERS_PER_CPU_REPLICA * max_size))
    batch_rows = config.replica_batch_rows or (
        GPU_BATCH_ROWS if device == "cuda" else CPU_BATCH_ROWS)
    # Reads, normalizing and writes are Ray tasks of one logical CPU each. Pools that
    # reserved every CPU would leave them none and the job would wait forever (a plain
    # 2-CPU Ray: one replica and one tokenizer). So the pools share what is left after
    # one CPU, in proportion; only the reservations shrink, not the replica's threads.
    room = sum(n.cpus for n in nodes) - 1
    held = max_size * num_cpus + tokenizers
    share = min(1.0, room / held) if room > 0 else 1.0
    return ReplicaPlan(device, num_gpus, _ray_cpus(num_cpus * share), config.min_replicas,
                       max_size, tokenizers, batch_rows, *replica_dtype(config, device),
                       threads, tokenizer_cpus=_ray_cpus(share))


def _ray_cpus(cpus: float) -> float:
    """A CPU reservation Ray takes: a fraction below one, else a whole number."""
    return round(cpus, 4) if cpus < 1 else float(math.floor(cpus))


# a removal takes milliseconds on a live cluster; past this, Ray is gone (wait_at_most)
PLACEMENT_GROUP_REMOVAL_S = 5.0


@contextlib.contextmanager
def reserved(plan: ReplicaPlan) -> Iterator[ReplicaPlan]:
    """Hold the CPUs of the plan's CPU replicas for the job: a placement group of one
    bundle of the CPUs a replica reserves (its threads) per replica, spread over the
    nodes. Without it, tokenizer
    actors and tasks take a node's scoring CPUs first and the replicas that come later
    crowd onto whichever node has room. GPU replicas need none: GPUs are theirs alone.
    Ray moves the bundles of a lost node to the nodes that are left or that replace it."""
    if plan.device != "cpu":
        yield plan
        return
    from ray.util.placement_group import placement_group, remove_placement_group

    name = f"rstar-batch-replicas-{uuid.uuid4().hex[:12]}"
    group = placement_group([{"CPU": float(plan.num_cpus)}] * plan.max_size,
                            strategy="SPREAD", name=name)
    try:
        yield dataclasses.replace(plan, placement_group=name)
    finally:
        wait_at_most(PLACEMENT_GROUP_REMOVAL_S, "removing the replicas' placement group",
                     lambda: remove_placement_group(group))


def placement(plan: ReplicaPlan) -> dict[str, Any]:
    """Ray remote arguments that put a replica into the plan's placement group."""
    if not plan.placement_group:
        return {}
    from ray.util import get_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        get_placement_group(plan.placement_group))}


def describe_plan(plan: ReplicaPlan) -> str:
    """One line for the log: where, how many, in what dtype, fed by how many tokenizers."""
    per = (f"{plan.num_gpus:g} GPU" if plan.device == "cuda"
           else f"{plan.threads} CPU{'s' if plan.threads > 1 else ''} (torch threads)")
    return (f"{plan.device} in {plan.dtype} ({plan.dtype_reason}); {plan.min_size}.."
            f"{plan.max_size} replicas of {per} each, up to {plan.tokenizers} tokenizers")


def cpu_replicas(config: RerankConfig, nodes: Sequence[Node]) -> tuple[int, int]:
    """(threads of each CPU replica, how many fit the cluster).

    Each node scores on its cores less NODE_RESERVE_CPUS (at least one core where it
    has two CPUs). A replica takes --cpus-per-replica of them, else as many as the
    smallest node scores on: one replica a node, each with all of its scoring cores.
    """
    room = [_scoring_cores(n) for n in nodes]
    room = [r for r in room if r >= 1]
    if config.cpus_per_replica is not None:
        if config.cpus_per_replica != int(config.cpus_per_replica):
            raise ConfigError(
                f"cpus_per_replica {config.cpus_per_replica} on CPU: a CPU replica runs one "
                "torch thread per CPU it reserves, so it must be a whole number")
        threads = int(config.cpus_per_replica)
    else:
        threads = min(room, default=1)
    return threads, max(1, sum(r // threads for r in room))


def _scoring_cores(node: Node) -> int:
    """Cores of `node` left to CPU replicas once tokenizing and I/O have theirs."""
    scoring = min(node.real_cores, node.cpus - NODE_RESERVE_CPUS)
    return int(scoring) if scoring >= 1 else (1 if node.cpus >= 2 else 0)


def replica_dtype(config: RerankConfig, device: str) -> tuple[str, str]:
    """The replicas' dtype and why. --dtype auto for CPU replicas is decided here, by
    the driver's CPU, so that a job scores in one dtype and the manifest says which;
    a GPU replica picks bfloat16 or float16 by its own GPU."""
    if config.dtype != "auto":
        return config.dtype, "--dtype"
    if device == "cuda":
        return "auto", "bfloat16 on GPUs that support it, else float16"
    if config.quantize != "none":
        return "float32", "int8 quantization starts from float32"
    return auto_cpu_dtype()


def scorer_kwargs(config: RerankConfig, model: Any, plan: ReplicaPlan) -> dict[str, Any]:
    """Constructor arguments of a model replica (and its retries)."""
    return dict(model=model, device=plan.device, dtype=plan.dtype,
                activation=config.score_activation, batch_tokens=config.batch_tokens,
                max_batch_pairs=config.max_batch_pairs, cpu_threads=plan.threads,
                trust_remote_code=config.trust_remote_code, retries=config.batch_retries,
                quantize=config.quantize, compile=config.compile)


def on_tokenizers(ds: Any, stage: type, config: RerankConfig, model: Any, plan: ReplicaPlan,
                  batch_rows: int, assembler: Any = None,
                  tasks_per_actor: Optional[int] = None, **stage_kwargs: Any) -> Any:
    """`stage` (Tokenize, TokenizePassages, TokenizeWhole, ReadTokenize) as a pool of
    CPU tokenizer actors, one started and more added, up to the plan's, while blocks
    queue for them. An `assembler` the driver verified travels to them, so they load no
    model files. `tasks_per_actor`: how many calls wait at each actor (Ray Data's
    default when None)."""
    import ray.data

    kwargs = dict(model=model, max_length=config.max_length,
                  trust_remote_code=config.trust_remote_code,
                  passages=PassagePolicy.of(config), texts_by=config.tokenizer_backend,
                  **stage_kwargs)
    if assembler is not None:
        kwargs["assembler"] = assembler
    return ds.map_batches(
        stage, fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.tokenizers,
                                           max_tasks_in_flight_per_actor=tasks_per_actor),
        batch_size=batch_rows, batch_format="pyarrow", num_cpus=plan.tokenizer_cpus)


# The first slice of a replica's first call: small, so that the first commit comes
# seconds after scoring starts and the replica learns its rate from it.
FIRST_SLICE_ROWS = 64


class CommitClock:
    """Rows for a replica's next slice, so that slices take about `seconds` each: from
    the rows per second its slices so far took to score and commit."""

    def __init__(self, seconds: float, first_rows: int = FIRST_SLICE_ROWS) -> None:
        self.seconds, self.first_rows = seconds, first_rows
        self.rate: Optional[float] = None  # rows per second

    def next_rows(self, left: int) -> int:
        rows = (self.first_rows if self.rate is None
                else max(1, int(self.rate * self.seconds)))
        # no stub of a slice at the end: up to 1.5 slices go as one
        return left if left <= rows * 3 // 2 else rows

    def took(self, rows: int, seconds: float) -> None:
        rate = rows / max(seconds, 1e-6)
        self.rate = rate if self.rate is None else (self.rate + rate) / 2


class ReplicaCommits:
    """A model replica whose scored rows go to be committed: `map_batches` class ending
    pass 1.

    It scores its batch in slices of consecutive rows, sized by a `CommitClock` to
    about `commit_seconds` each, and hands each slice to `sink` (io/scored.HandToWriter:
    the commit writer on its node, which uploads beside scoring) before the next one
    starts. So however slow its model, a replica hands over its work about every
    `commit_seconds`, and once the job is asked to stop it takes no further slice.
    Scored rows go to storage through the writer; the replica returns only what it
    handed over.
    """

    def __init__(self, stage: type, stage_kwargs: dict[str, Any],
                 sink: Callable[[pa.Table], pa.Table], commit_seconds: float,
                 stop: Optional[StopSignal] = None) -> None:
        self.stage = stage(**stage_kwargs)
        self.sink, self.stop = sink, stop
        self.clock = CommitClock(commit_seconds)

    def __call__(self, batch: pa.Table) -> pa.Table:
        commits, start = [COMMITS.empty_table()], 0
        while start < batch.num_rows and not stop_requested(self.stop):
            rows = self.clock.next_rows(batch.num_rows - start)
            began = time.monotonic()
            piece = batch.slice(start, rows)
            commits.append(self.sink(self.stage(piece), piece))
            self.clock.took(rows, time.monotonic() - began)
            start += rows
        settle = getattr(self.sink, "settle", None)
        if settle is not None:  # the call's rows are the writer's before it returns
            settle()
        return pa.concat_tables(commits)


def committing_replicas(ds: Any, stage: type, kwargs: dict[str, Any], plan: ReplicaPlan,
                        batch_rows: int, sink: Callable[[pa.Table], pa.Table],
                        config: RerankConfig, stop: Optional[StopSignal]) -> Any:
    """`stage` on a pool of model replicas that commit what they score (pass 1's end):
    the dataset's rows are the commits."""
    return on_replicas(ds, ReplicaCommits, dict(
        stage=stage, stage_kwargs=kwargs, sink=sink, commit_seconds=config.commit_seconds,
        stop=stop), plan, batch_rows)


def on_replicas(ds: Any, stage: type, kwargs: dict[str, Any], plan: ReplicaPlan,
                batch_rows: int) -> Any:
    """`stage` as a pool of model replicas, as many as the plan allows."""
    import ray.data

    return ds.map_batches(
        stage, fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(
            min_size=plan.min_size, max_size=plan.max_size,
            # Two batches per replica keep a GPU fed while bounding what a kill loses.
            max_tasks_in_flight_per_actor=2),
        batch_size=batch_rows, batch_format="pyarrow",
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus or None, **placement(plan))
