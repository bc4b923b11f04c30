"""The CPU replica plan: threads equal the CPUs a replica reserves, and the pool grows
to every CPU node's cores that tokenizing and I/O leave."""

from __future__ import annotations

import pytest

from rstar_batch.cluster import CORES_LABEL, Node, node_of
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.replicas import describe_plan, plan_replicas, tokenizer_batch_rows


def _plan(nodes: list[Node], **kw):
    return plan_replicas(RerankConfig(candidates=["x"], output="o", **kw), nodes)


def _shape(plan) -> tuple:
    return plan.device, plan.threads, plan.num_cpus, plan.min_size, plan.max_size, plan.tokenizers


def test_one_cpu_node_runs_one_replica_on_all_cores_but_two():
    # 16 CPUs: a replica of 14 threads; one CPU for a tokenizer, one for reads and writes
    assert _shape(_plan([Node(cpus=16)])) == ("cpu", 14, 14.0, 1, 1, 1)


@pytest.mark.parametrize("count", [2, 10])
def test_every_cpu_node_gets_a_replica_and_the_rest_feed_them(count):
    plan = _plan([Node(cpus=16)] * count)
    # up to two tokenizers a replica, within the CPUs they leave (less one for I/O)
    tokenizers = min(2 * count, 16 * count - 14 * count - 1)
    assert _shape(plan) == ("cpu", 14, 14.0, 1, count, tokenizers)


def test_a_head_without_cpus_and_gpu_less_workers_of_other_sizes():
    # KubeRay's head declares no CPUs; workers of 8 and 32 CPUs: replicas as wide as the
    # smallest worker's share (6), so the larger worker takes five of them
    plan = _plan([Node(cpus=0), Node(cpus=8), Node(cpus=32)])
    assert (plan.threads, plan.max_size) == (6, 1 + 5)


def test_small_nodes_still_score_on_one_core_each():
    assert _shape(_plan([Node(cpus=2)] * 3))[:5] == ("cpu", 1, 1.0, 1, 3)
    # a one-CPU node would leave nothing to feed it: no replica there
    assert _plan([Node(cpus=1), Node(cpus=4)]).max_size == 1


def test_logical_cpus_beyond_the_cores_do_not_add_threads():
    # the embedded Ray on 2 cores declares 8 logical CPUs and labels its cores: one
    # replica of two threads, as many as the cores, and two tokenizers beside it
    node = node_of({"Resources": {"CPU": 8.0}, "Labels": {CORES_LABEL: "2"}})
    assert node == Node(cpus=8.0, cores=2)
    assert _shape(_plan([node])) == ("cpu", 2, 2.0, 1, 1, 2)
    assert node_of({"Resources": {"CPU": 4.0, "GPU": 1.0}, "Labels": {}}) == Node(4.0, 1.0)


def test_cpus_per_replica_splits_nodes_into_narrower_replicas():
    plan = _plan([Node(cpus=16)] * 2, cpus_per_replica=4)
    assert (plan.threads, plan.num_cpus, plan.max_size) == (4, 4.0, 2 * 3)  # 14 // 4 a node
    assert _plan([Node(cpus=16)] * 2, cpus_per_replica=4, max_replicas=2).max_size == 2
    # a thread is a whole CPU: a fraction would run more threads than it reserves
    with pytest.raises(ConfigError, match="whole number"):
        _plan([Node(cpus=16)], cpus_per_replica=1.5)
    # GPU replicas reserve what they are told (default one CPU)
    assert _plan([Node(cpus=16, gpus=1)], cpus_per_replica=0.5).num_cpus == 0.5
    assert _plan([Node(cpus=16, gpus=1)]).num_cpus == 1.0


def test_a_cpu_cluster_scaling_from_zero_starts_with_one_narrow_replica():
    # no CPU node yet: one replica of one thread (set --cpus-per-replica and
    # --max-replicas for workers still to come)
    assert _shape(_plan([Node(cpus=0)]))[:5] == ("cpu", 1, 1.0, 1, 1)


def test_the_plan_is_logged_in_one_line():
    line = describe_plan(_plan([Node(cpus=16)] * 2, dtype="float32"))
    assert line == ("cpu in float32 (--dtype); 1..2 replicas of 14 CPUs (torch threads) "
                    "each, up to 3 tokenizers")


def test_tokenizer_blocks_are_small_for_texts_and_a_whole_replica_call_for_ids():
    gpu = _plan([Node(cpus=16, gpus=1)], replica_batch_rows=32768)
    # texts: a 32768-row block would take a tokenizer ~7 s; ids: only queries to tokenize
    assert tokenizer_batch_rows(gpu, passages_tokenized=False) == 2048
    assert tokenizer_batch_rows(gpu, passages_tokenized=True) == 32768
    cpu = _plan([Node(cpus=16)], replica_batch_rows=512)
    assert tokenizer_batch_rows(cpu, passages_tokenized=False) == 512


def test_int8_is_refused_before_scoring_when_device_auto_finds_gpus():
    with pytest.raises(ConfigError, match="1 GPU.*--device cpu"):
        _plan([Node(cpus=16, gpus=1)], quantize="int8")
    assert _plan([Node(cpus=16, gpus=1)], quantize="int8", device="cpu").device == "cpu"
    with pytest.raises(ConfigError, match="int8"):   # --device cuda: at once, in config
        RerankConfig(quantize="int8", device="cuda")


@pytest.mark.parametrize("nodes", [[Node(cpus=2)], [Node(cpus=1)], [Node(cpus=2, gpus=1)],
                                   [Node(cpus=0), Node(cpus=2)]])
def test_the_pools_always_leave_a_cpu_for_reads_and_writes(nodes):
    """On a plain 2-CPU Ray a replica and a tokenizer used to reserve both CPUs, and the
    read and write tasks never ran: the job waited forever."""
    plan = _plan(nodes)
    total = sum(n.cpus for n in nodes)
    held = plan.max_size * plan.num_cpus + plan.tokenizers * plan.tokenizer_cpus
    assert held <= max(total - 1, 0) + 1e-9 or total <= 1
    for cpus in (plan.num_cpus, plan.tokenizer_cpus):   # what Ray accepts
        assert 0 < cpus < 1 or cpus == int(cpus)
    assert plan.threads >= 1


def test_roomy_clusters_keep_whole_cpu_reservations():
    plan = _plan([Node(cpus=16)] * 2)
    assert (plan.num_cpus, plan.tokenizer_cpus) == (14.0, 1.0)
