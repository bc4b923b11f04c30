"""Shared fixtures: the tiny model, sample data, the reference scores, one Ray."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rstar_batch.base.cores import usable_cores
from rstar_batch.cluster import CORES_LABEL
from rstar_batch.testing import MICRO_ARCHITECTURE, make_tiny_model, write_sample_data
from rstar_batch.tiny_families import FAMILIES, make_family_model
from tests.jobs import moto_s3, one_node_cluster
from tests.reference import reference_scores

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The files whose tests took longest (`pytest --durations`, 2026-12-07: 123, 123, 111,
# 86, 55 and 46 s of one worker's time); the rest follow by their number of slow tests.
LONGEST_FIRST = ("test_nightly.py", "test_resume.py", "test_multi_node.py",
                 "test_tokenized_corpus.py", "test_score_corpus.py", "test_object_storage.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, each file's tests in their order.

    The suite runs on two pytest-xdist workers, a file at a time each (pyproject.toml's
    addopts: a file's module fixtures, such as the multi-node cluster, start once). A
    long file handed out last runs alone at the end while the other worker idles;
    handed out first, the short files fill in around it."""
    def path(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    slow: dict[str, int] = {}
    for item in items:
        slow[path(item)] = slow.get(path(item), 0) + (item.get_closest_marker("slow") is not None)
    collected = {file: i for i, file in enumerate(slow)}

    def rank(file: str) -> tuple[int, int, int]:
        name = file.rsplit("/", 1)[-1]
        first = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return first, -slow[file], collected[file]

    items.sort(key=lambda item: rank(path(item)))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """R*'s architecture with random weights: for what depends on the model's size
    (the layers' numerics, dtypes, the [CLS]-only last layer)."""
    return make_tiny_model(str(tmp_path_factory.mktemp("model") / "tiny-r-star"))


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> str:
    """R*'s tokenizer with a one-layer, 64-wide BERT: for the jobs end to end, whose
    properties (exactly-once, order, joins, resume, parity with the one-pair reference)
    do not depend on the model's size, and which R*'s size would spend scoring (its
    one-pair reference of the sample alone took 71-262 s on 2 cores)."""
    return make_tiny_model(str(tmp_path_factory.mktemp("model") / "micro"),
                           architecture=MICRO_ARCHITECTURE)


def edge_case_table() -> pa.Table:
    """Pairs that stress tokenization and padding; ids are integers."""
    long_words = " ".join(["glacier river engine"] * 400)          # far past 512 tokens
    rows = [
        (1, "violin festival Paris", 10, long_words),
        (1, "violin festival Paris", 11, "violin"),                 # one word
        (1, "violin festival Paris", 12, ""),                       # empty passage
        (1, "violin festival Paris", 13, "Café in Zürich, naïve résumé of São Paulo."),
        (1, "violin festival Paris", 14, "東京 and 北京 数据 検索 음악 😀 🚀 ✨ concerts"),
        (1, "violin festival Paris", 15, long_words + " end"),
        (2, "a lone query with one candidate", 20, "the only candidate passage"),
        (3, "東京 😀 café " * 150, 30, "query longer than the passage, cut first"),
    ]
    many = [(4, "comet telescope orbit", 100 + i, f"comet {'telescope ' * i}orbit {i}")
            for i in range(70)]
    qid, query, did, passage = zip(*(rows + many))
    return pa.table({"query_id": pa.array(qid, pa.int64()), "query": list(query),
                     "doc_id": pa.array(did, pa.int64()), "passage": list(passage)})


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, str]:
    """A tiny model of each family, with its own tokenizer (rstar_batch/tiny_families.py)."""
    root = tmp_path_factory.mktemp("families")
    return {family: make_family_model(family, str(root / family)) for family in FAMILIES}


@pytest.fixture(scope="session")
def edge_cases() -> pa.Table:
    return edge_case_table()


@pytest.fixture(scope="session")
def edge_case_reference(tiny_model, edge_cases) -> dict:
    return reference_scores(tiny_model, edge_cases)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> str:
    """20 queries × 50 candidates in two Parquet parts (the issue's acceptance set)."""
    out = str(tmp_path_factory.mktemp("sample") / "candidates")
    write_sample_data(out, num_queries=20, candidates_per_query=50, files=2, seed=7)
    return out


@pytest.fixture(scope="session")
def sample_reference(micro_model, sample_dir) -> dict:
    return reference_scores(micro_model, pq.read_table(sample_dir))


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory) -> dict[str, str]:
    """A local S3 API (moto's server) for the session, and the environment that reaches it."""
    with moto_s3(str(tmp_path_factory.mktemp("aws"))) as env:
        yield env


@pytest.fixture(scope="session")
def cluster(s3_env):
    """One Ray cluster that the end-to-end jobs of the whole session join (`run(...,
    cluster=cluster)`), torn down by process id: tests about the job, not about
    starting Ray, pay Ray's start once. Its node reaches the session's S3 as a job's
    driver does (the object-storage tests' jobs run on it)."""
    with one_node_cluster(env=s3_env) as shared:
        yield shared


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the in-process tests; torn down even after failures."""
    import ray

    # as the embedded Ray does: logical CPUs for the tokenizers beside the replica,
    # and a label saying how many cores there are for its threads
    ray.init(address="local", num_cpus=8, include_dashboard=False,
             labels={CORES_LABEL: str(usable_cores())},
             log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
