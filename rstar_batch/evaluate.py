"""`rstar-batch evaluate`: how much reranking helps, measured against judgments.

A run is our ranked output folder, a TREC run file (`qid Q0 docid rank score
tag`), or Parquet with query_id, doc_id and a score column (a first stage).
Qrels are TREC text (`qid 0 docid relevance`) or Parquet (query_id, doc_id,
relevance). Ids are compared as strings.

Metrics come from ir-measures, one value per query, averaged here over *every*
judged query (every query id in the qrels): a judged query the run does not rank
counts as zero, as with `trec_eval -c` and the MS MARCO scorer. (ir-measures
alone averages over the queries in the run.)

Each run is turned into one explicit order before ir-measures sees it, so every
metric provider agrees on it: our output's `rank` column; for scores, trec_eval's
order: score descending as float32, ties by doc id descending.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rstar_batch.base import fs as fsio
from rstar_batch.config import ConfigError
from rstar_batch.export import ranked_parts, read_part
from rstar_batch.io.convert import FORMATS, read_text
from rstar_batch.progress import checkpoint

log = logging.getLogger(__name__)

DEFAULT_METRICS = ["RR@10", "nDCG@10", "R@100", "AP"]
INSTALL = "pip install 'rstar-batch[eval]'"
JSON_NAME = "_evaluation.json"

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]  # query id -> doc id -> score, higher is better


def _ir_measures() -> Any:
    try:
        import ir_measures
    except ImportError:
        raise ConfigError(f"evaluate needs ir-measures; install it with {INSTALL}") from None
    return ir_measures


def _locate(uri: str, what: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path, kind): kind is 'folder', 'parquet' or 'text'."""
    fs, path = fsio.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{what} '{uri}' does not exist")
    if info.type == pafs.FileType.Directory:
        return fs, path, "folder"
    with fs.open_input_file(path) as src:
        head = src.read(4)
    return fs, path, "parquet" if head == b"PAR1" else "text"


def _read_text(fs: pafs.FileSystem, path: str, fmt: str, uri: str) -> pa.Table:
    """A whole TREC text file, parsed as `rstar-batch convert` parses it (ids as strings);
    the first bad line is a ConfigError naming the file and line."""
    blocks = [rows for rows, _ in read_text(fs, path, fmt, uri=uri)]
    return pa.concat_tables(blocks) if blocks else FORMATS[fmt].schema().empty_table()


def _parquet_files(fs: pafs.FileSystem, path: str, kind: str, uri: str) -> list[str]:
    """The data files of a Parquet file or folder (names starting '_' or '.' skipped)."""
    if kind != "folder":
        return [path]
    files = fsio.parquet_files(fs, path)
    if not files:
        raise ConfigError(f"folder '{uri}' holds no .parquet files")
    return files


def _read_parquet(fs: pafs.FileSystem, files: list[str], columns: list[str]) -> pa.Table:
    tables = []
    for file in files:
        names = pq.read_schema(file, filesystem=fs).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ConfigError(f"'{file}' lacks column(s) {missing} (it has {names})")
        tables.append(pq.read_table(file, columns=columns, filesystem=fs))
    return pa.concat_tables(tables, promote_options="permissive")


def _as_str(column: Any) -> Any:
    return pc.cast(column, pa.string())


def read_qrels(uri: str) -> Qrels:
    """Judgments from TREC text (`qid 0 docid relevance`) or Parquet."""
    fs, path, kind = _locate(uri, "qrels")
    qrels: Qrels = {}
    if kind == "text":
        table = _read_text(fs, path, "qrels", uri)
    else:
        table = _read_parquet(fs, _parquet_files(fs, path, kind, uri),
                              ["query_id", "doc_id", "relevance"]).drop_null()
    for q, d, rel in zip(_as_str(table["query_id"]).to_pylist(),
                         _as_str(table["doc_id"]).to_pylist(),
                         pc.cast(table["relevance"], pa.int64()).to_pylist()):
        qrels.setdefault(q, {})[d] = rel
    if not qrels:
        raise ConfigError(f"qrels '{uri}' hold no judgments")
    return qrels


def _run_dict(qids: Any, dids: Any, order: Any, by_rank: bool, uri: str) -> Run:
    """{query: {doc: -position}} in the run's one order (see the module docstring)."""
    table = pa.table({"q": _as_str(qids), "d": _as_str(dids), "k": order}).drop_null()
    keys = ([("q", "ascending"), ("k", "ascending")] if by_rank else
            [("q", "ascending"), ("k", "descending"), ("d", "descending")])
    table = table.take(pc.sort_indices(table, keys))
    run: Run = {}
    repeated = 0
    for q, d in zip(table["q"].to_pylist(), table["d"].to_pylist()):
        docs = run.setdefault(q, {})
        if d in docs:
            repeated += 1
        else:
            docs[d] = -float(len(docs) + 1)
    if repeated:
        log.warning("%s: %d repeated (query, doc) pair(s); each counted once, at its best "
                    "position", uri, repeated)
    return run


def _text_run(fs: pafs.FileSystem, path: str, uri: str) -> Run:
    table = _read_text(fs, path, "trec-run", uri)
    return _run_dict(table["query_id"], table["doc_id"],
                     pc.cast(table["score"], pa.float32(), safe=False), False, uri)


def read_run(uri: str, score_column: Optional[str] = None) -> Iterator[Run]:
    """A run as pieces that each hold whole queries (one per part of our output).

    Parquet is ordered by `score_column` if given, else by a `rank` column
    (1 = best), else by a `score` column.
    """
    fs, path, kind = _locate(uri, "run")
    if kind == "text":
        yield _text_run(fs, path, uri)
        return
    if (kind == "folder" and score_column is None
            and fsio.exists(fs, fsio.join(path, checkpoint.MARKER))):
        part_fs, parts = ranked_parts(uri)
        for part in parts:
            table = read_part(part_fs, part, ["query_id", "doc_id", "rank"])
            yield _run_dict(table["query_id"], table["doc_id"], table["rank"], True, part)
        return
    files = _parquet_files(fs, path, kind, uri)
    names = pq.read_schema(files[0], filesystem=fs).names
    column = score_column or ("rank" if "rank" in names else "score")
    if column not in names:
        raise ConfigError(f"run '{uri}' has no '{column}' column (it has {names}); name "
                          "its score column (--baseline-score-column for a baseline)")
    table = _read_parquet(fs, files, ["query_id", "doc_id", column])
    by_rank = score_column is None and column == "rank"
    order = table[column] if by_rank else pc.cast(table[column], pa.float32(), safe=False)
    yield _run_dict(table["query_id"], table["doc_id"], order, by_rank, uri)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One run's metrics, averaged over all judged queries."""

    source: str
    queries_ranked: int           # judged queries the run ranks at least one doc for
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A run (and optionally a baseline) measured against one set of qrels."""

    qrels: str
    judged_queries: int
    run: RunResult
    baseline: Optional[RunResult] = None

    def difference(self) -> Optional[dict[str, float]]:
        if self.baseline is None:
            return None
        return {m: v - self.baseline.metrics[m] for m, v in self.run.metrics.items()}

    def to_json(self) -> dict:
        return {"qrels": self.qrels, "judged_queries": self.judged_queries,
                "run": dataclasses.asdict(self.run),
                "baseline": dataclasses.asdict(self.baseline) if self.baseline else None,
                "difference": self.difference()}

    def table(self) -> str:
        """The comparison as aligned text, one metric a line."""
        diff = self.difference()
        width = max(len(m) for m in [*self.run.metrics, "metric"])
        head = f"{'metric':<{width}}  {'run':>8}"
        if diff is not None:
            head += f"  {'baseline':>8}  {'difference':>10}"
        lines = [head]
        for name, value in self.run.metrics.items():
            line = f"{name:<{width}}  {value:8.4f}"
            if diff is not None:
                shown = round(diff[name], 4) + 0.0  # no "-0.0000" for float noise
                line += f"  {self.baseline.metrics[name]:8.4f}  {shown:+10.4f}"
            lines.append(line)
        ranked = f"judged queries: {self.judged_queries}; ranked by the run: " \
                 f"{self.run.queries_ranked}"
        if self.baseline is not None:
            ranked += f", by the baseline: {self.baseline.queries_ranked}"
        lines.append(ranked + " (a judged query a run does not rank counts as 0)")
        return "\n".join(lines)

    def save(self, uri: str) -> None:
        fs, path = fsio.resolve(uri)
        fsio.write_json(fs, path, self.to_json())


def _parse_metrics(irm: Any, names: Sequence[str]) -> list[Any]:
    measures = []
    for name in names:
        try:
            measures.append(irm.parse_measure(name))
        except (NameError, ValueError, TypeError) as exc:
            raise ConfigError(f"unknown metric '{name}' ({exc}); examples: "
                              f"{' '.join(DEFAULT_METRICS)} P@10 (see ir-measur.es)") from None
    return list(dict.fromkeys(measures))  # a metric named twice is computed once


def _measure_run(evaluator: Any, measures: list[Any], qrels: Qrels, pieces: Iterator[Run],
                 uri: str) -> RunResult:
    totals = {str(m): 0.0 for m in measures}
    seen: set[str] = set()
    for piece in pieces:
        judged = {q: docs for q, docs in piece.items() if q in qrels}
        if not judged:
            continue
        if seen & judged.keys():
            raise ConfigError(f"run '{uri}' holds a query in two parts; a part must hold "
                              "whole queries")
        seen |= judged.keys()
        for metric in evaluator.iter_calc(judged):
            if metric.query_id in judged:  # some providers also report absent queries
                totals[str(metric.measure)] += metric.value
    # Judged queries the run does not rank add 0 to the totals but count in the mean.
    return RunResult(uri, len(seen), {m: t / len(qrels) for m, t in totals.items()})


def evaluate(run: str, qrels: str, baseline: Optional[str] = None,
             metrics: Optional[Sequence[str]] = None,
             baseline_score_column: Optional[str] = None) -> Evaluation:
    """Measure `run` (and `baseline`) against `qrels`; see the module docstring."""
    irm = _ir_measures()
    measures = _parse_metrics(irm, metrics or DEFAULT_METRICS)
    judgments = read_qrels(qrels)
    evaluator = irm.evaluator(measures, judgments)
    ours = _measure_run(evaluator, measures, judgments, read_run(run), run)
    base = None
    if baseline is not None:
        base = _measure_run(evaluator, measures, judgments,
                            read_run(baseline, baseline_score_column), baseline)
    log.info("evaluated %s against %d judged queries", run, len(judgments))
    return Evaluation(qrels, len(judgments), ours, base)


def default_json_path(run: str) -> str:
    """Where the JSON goes without --json: inside a run folder, else beside a run file."""
    fs, path = fsio.resolve(run)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return fsio.join(run, JSON_NAME)
    return run + ".eval.json"
