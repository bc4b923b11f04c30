"""Command line: argument parsing only; every command calls the Python API.

The `rerank` options are generated from `RerankConfig`'s fields, so the CLI,
the YAML keys and the docs cannot drift apart. Values given on the command line
override those in `--config FILE`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from typing import Any, Optional, Sequence

from rstar_batch import supervise
from rstar_batch.config import ConfigError, RerankConfig, field_type
from rstar_batch.progress.drain import EXIT_STOPPED, Stopped, watch_from_the_start


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """One option per RerankConfig field (less `leave_out`), grouped as the fields are."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(RerankConfig):
        if f.name in leave_out:
            continue
        meta = f.metadata
        group = groups.get(meta["group"]) or parser.add_argument_group(meta["group"])
        groups[meta["group"]] = group
        base, optional = field_type(f)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "required" if meta.get("required") else f"default: {default}"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                      help=f"{meta['help']} ({shown})")
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kwargs.update(nargs="+", metavar=f.name.upper())
        elif typing.get_origin(base) is typing.Literal:
            kwargs.update(choices=typing.get_args(base))
        else:
            kwargs.update(type=base, metavar=f.name.upper())
        group.add_argument(_flag(f.name), **kwargs)


# Options that only make sense with candidate pairs: score-corpus has none.
CANDIDATE_ONLY = ("candidates", "nested_column", "on_bad_file", "score_cache")
# What tokenize-corpus reads of the config: the corpus, the tokenizer, the job's own knobs.
TOKENIZE_FIELDS = ("corpus", "output", "overwrite", "restart", "max_rejected_fraction",
                   "checkpoint_rows", "drain_seconds", "progress_seconds", "doc_id_column",
                   "passage_column",
                   "model", "revision", "trust_remote_code", "tokenize_workers",
                   "tokenizer_backend", "replica_batch_rows", "address")
NOT_TOKENIZE = tuple(f.name for f in dataclasses.fields(RerankConfig)
                     if f.name not in TOKENIZE_FIELDS)


def config_from_args(args: argparse.Namespace) -> RerankConfig:
    names = {f.name for f in dataclasses.fields(RerankConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if getattr(args, "config", None):
        return RerankConfig.from_yaml(args.config, overrides=given)
    return RerankConfig.from_dict(given, source="command line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rstar-batch",
        description="Rerank retrieval candidates with the R* cross-encoder on Ray.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="Logging detail (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rerank = commands.add_parser(
        "rerank", help="Score and rank candidate Parquet; write ranked Parquet.",
        description="Score every (query, passage) candidate with the model and write "
                    "each query's candidates ranked. Options may also come from "
                    "--config FILE (YAML keys = option names with underscores); the "
                    "command line wins.")
    rerank.add_argument("--config", metavar="FILE", help="YAML file of options (default: none)")
    add_config_options(rerank)

    corpus = commands.add_parser(
        "score-corpus", help="Score every query against a whole corpus; keep the top K.",
        description="Score each query of --queries against every passage of --corpus "
                    "and write each query's best --top-k passages as ranked Parquet (the "
                    "rerank output's schema). The query × passage pairs are never "
                    "stored: each corpus block keeps its own top K, merged exactly. "
                    "Takes rerank's options, less --candidates; resumes like rerank.")
    corpus.add_argument("--config", metavar="FILE", help="YAML file of options (default: none)")
    add_config_options(corpus, leave_out=CANDIDATE_ONLY)

    tokenize = commands.add_parser(
        "tokenize-corpus", help="Tokenize a corpus once, for every rerank/score-corpus run.",
        description="Write every passage of --corpus as its token ids (Parquet: doc_id, "
                    "passage_ids, empty_passage) with the tokenizer's fingerprint, to "
                    "--output T. Pass T as --corpus to rerank or score-corpus with the "
                    "same model: only the queries are tokenized then. Rows with a null "
                    "id or passage go to T/_rejected/. Resumes like rerank.")
    tokenize.add_argument("--config", metavar="FILE",
                          help="YAML file of options (default: none)")
    add_config_options(tokenize, leave_out=NOT_TOKENIZE)

    cache = commands.add_parser(
        "cache", help="Maintain a score cache (--score-cache).",
        description="compact: merge the cache's files into one per range of buckets, "
                    "keep each pair's latest score, and with --keep-days drop pairs no "
                    "job used within that many days. Safe to rerun after a kill; jobs "
                    "may run meanwhile.")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True,
                                          metavar="CACHE_COMMAND")
    compact = cache_commands.add_parser("compact", help="Merge files; drop unused entries.")
    compact.add_argument("uri", metavar="URI", help="The --score-cache to compact")
    compact.add_argument("--keep-days", type=float, default=None, metavar="N",
                         help="Drop entries no job used within N days (default: keep all)")

    sample = commands.add_parser("sample-data", help="Write a synthetic candidate set.")
    sample.add_argument("out", metavar="OUT", help="Folder to write Parquet parts into")
    sample.add_argument("--queries", type=int, default=20, help="Queries (default: 20)")
    sample.add_argument("--candidates", type=int, default=50,
                        help="Candidates per query (default: 50)")
    sample.add_argument("--files", type=int, default=2, help="Parquet parts (default: 2)")
    sample.add_argument("--seed", type=int, default=0, help="Random seed (default: 0)")
    sample.add_argument("--qrels", metavar="FILE", default=None,
                        help="Also write synthetic judgments there as TREC qrels: per "
                             "query, the candidates sharing most words with the query "
                             "(default: none)")

    tiny = commands.add_parser(
        "make-tiny-model", help="Write a random-weight model with R*'s architecture.",
        description="For offline smoke runs and tests: R*'s exact architecture with "
                    "random weights and a locally trained tokenizer. Its scores are "
                    "meaningless.")
    tiny.add_argument("out", metavar="DIR", help="Folder to write the model into")

    status = commands.add_parser(
        "status", help="Show a job's progress (or its summary) from its output folder.")
    status.add_argument("output", metavar="OUTPUT", help="The job's --output")
    status.add_argument("--json", action="store_true", help="Print JSON (default: text)")

    demo = commands.add_parser(
        "demo", help="Make sample data, rerank it on a local Ray, show the result.")
    demo.add_argument("--model", default=None,
                      help="Hub id or model folder (default: jaspercatapang/R-star)")
    demo.add_argument("--tiny-model", action="store_true",
                      help="Use a random-weight model with R*'s architecture, built "
                           "locally: no hub access, meaningless scores (default: off)")
    demo.add_argument("--workdir", default="rstar-demo",
                      help="Folder for the sample data and output (default: rstar-demo)")

    evaluate = commands.add_parser(
        "evaluate", help="Measure a ranked output (and a baseline) against qrels.",
        description="Compute RR@10, nDCG@10, ... averaged over every judged query (a "
                    "judged query a run does not rank counts as 0). Runs: an rstar-batch "
                    "output folder, a TREC run file, or Parquet with query_id, doc_id and "
                    "a score. Qrels: TREC text or Parquet (query_id, doc_id, relevance). "
                    "Needs pip install 'rstar-batch[eval]'.")
    evaluate.add_argument("--run", required=True, metavar="RUN",
                          help="The run to measure, e.g. a rerank --output (required)")
    evaluate.add_argument("--qrels", required=True, metavar="QRELS", help="Judgments (required)")
    evaluate.add_argument("--baseline", metavar="RUN", default=None,
                          help="A run to compare with, e.g. the first stage (default: none)")
    evaluate.add_argument("--baseline-score-column", metavar="NAME", default=None,
                          help="Score column of a Parquet baseline (default: rank if "
                               "present, else score)")
    evaluate.add_argument("--metrics", nargs="+", metavar="METRIC", default=None,
                          help="ir-measures names (default: RR@10 nDCG@10 R@100 AP)")
    evaluate.add_argument("--json", metavar="FILE", default=None,
                          help="Write the result as JSON there (default: _evaluation.json "
                               "in a run folder, RUN.eval.json beside a run file)")

    bias = commands.add_parser(
        "length-bias", help="How much a finished job's scores follow passage length.",
        description="Join a ranked output with its passages' lengths and report "
                    "Spearman's rho of score and length (over all pairs, and the mean "
                    "over queries) and the mean score per length decile. R*'s model card "
                    "warns it favours longer passages; see docs/evaluation.md.")
    bias.add_argument("output", metavar="OUTPUT", help="A finished rerank or score-corpus "
                                                       "--output")
    bias.add_argument("--candidates", nargs="+", required=True, metavar="PARQUET",
                      help="Where the passages are: the job's candidates or its corpus "
                           "(required)")
    bias.add_argument("--doc-id-column", default="doc_id",
                      help="Passage id column of --candidates (default: doc_id)")
    bias.add_argument("--passage-column", default="passage",
                      help="Passage text column of --candidates (default: passage)")
    bias.add_argument("--unit", choices=["words", "chars"], default="words",
                      help="Length in whitespace-separated words or characters "
                           "(default: words)")
    bias.add_argument("--plot", metavar="FILE.png", default=None,
                      help="Also draw mean score by length decile there; needs pip install "
                           "'rstar-batch[plot]' (default: no plot)")
    bias.add_argument("--json", metavar="FILE", default=None,
                      help="Also write the report as JSON there (default: none)")

    export = commands.add_parser(
        "export", help="Write a ranked output as a TREC run file.",
        description="Write 'qid Q0 docid rank score tag' lines, query by query in rank "
                    "order. Tied scores are lowered by the smallest float32 steps so "
                    "trec_eval, which re-sorts by score, keeps our order.")
    export.add_argument("--format", choices=["trec"], default="trec",
                        help="Output format (default: trec)")
    export.add_argument("output", metavar="OUTPUT", help="The rerank job's --output")
    export.add_argument("target", metavar="RUN_FILE", help="File to write")
    export.add_argument("--tag", default="rstar-batch", help="Run tag (default: rstar-batch)")

    convert = commands.add_parser(
        "convert", help="Convert a TSV / TREC text file to Parquet, streaming.",
        description="collection: docid<TAB>text -> doc_id, passage. queries: qid<TAB>text "
                    "-> query_id, query. top1000: qid<TAB>pid<TAB>query<TAB>passage -> "
                    "query_id, doc_id, query, passage (rerank's input). trec-run: qid Q0 "
                    "docid rank score tag -> query_id, doc_id, rank, score, tag. qrels: qid "
                    "0 docid rel -> query_id, doc_id, relevance. The last text field may "
                    "hold tabs; quotes are plain characters; invalid UTF-8 is replaced "
                    "and counted. .gz .bz2 .xz .zst inputs are unpacked.")
    convert.add_argument("format", metavar="FORMAT",
                         choices=["collection", "queries", "top1000", "trec-run", "qrels"],
                         help="collection, queries, top1000, trec-run or qrels")
    convert.add_argument("input", metavar="INPUT", help="Text file (local path or URI)")
    convert.add_argument("output", metavar="OUTPUT", help="Parquet file to write")
    convert.add_argument("--int-ids", action="store_true",
                         help="Store ids as int64; a non-integer id is a bad line "
                              "(default: ids stay strings)")
    convert.add_argument("--max-bad-lines", type=int, default=0, metavar="N",
                         help="Accept up to N lines that do not parse; they go, with "
                              "their line number and reason, to _NAME.rejected.parquet "
                              "beside OUTPUT NAME.parquet (default: 0, the first bad line "
                              "is an error)")
    return parser


def _run_rerank(args: argparse.Namespace) -> int:
    from rstar_batch.pipeline import rerank

    summary = rerank(config_from_args(args))
    print(summary.line())
    return 0


def _run_score_corpus(args: argparse.Namespace) -> int:
    from rstar_batch.score_corpus import score_corpus

    summary = score_corpus(config_from_args(args))
    print(summary.line())
    return 0


def _run_tokenize_corpus(args: argparse.Namespace) -> int:
    from rstar_batch.tokenize_corpus import summary_line, tokenize_corpus

    print(summary_line(tokenize_corpus(config_from_args(args))))
    return 0


def _run_sample(args: argparse.Namespace) -> int:
    from rstar_batch.testing import write_sample_data

    paths = write_sample_data(args.out, args.queries, args.candidates, args.files, args.seed,
                              qrels_path=args.qrels)
    print(f"wrote {args.queries * args.candidates} candidate pairs in {len(paths)} file(s) "
          f"under {args.out}")
    if args.qrels:
        print(f"wrote synthetic qrels to {args.qrels}")
    return 0


def _run_tiny(args: argparse.Namespace) -> int:
    from rstar_batch.testing import make_tiny_model

    print(f"wrote tiny model to {make_tiny_model(args.out)}")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from rstar_batch.status import job_status

    status = job_status(args.output)
    if args.json:
        print(json.dumps({**dataclasses.asdict(status), "percent": round(status.percent, 2),
                          "eta_s": status.eta_s}))
    else:
        print(status.text())
    return 0 if status.state != "NOT_OURS" else 2


def _run_demo(args: argparse.Namespace) -> int:
    from rstar_batch.demo import run_demo

    if args.tiny_model and args.model:
        raise ConfigError("give --model or --tiny-model, not both")
    run_demo(args.workdir, model=args.model, tiny=args.tiny_model)
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from rstar_batch.evaluate import default_json_path, evaluate

    result = evaluate(args.run, args.qrels, baseline=args.baseline, metrics=args.metrics,
                      baseline_score_column=args.baseline_score_column)
    print(result.table())
    target = args.json or default_json_path(args.run)
    result.save(target)
    print(f"wrote {target}")
    return 0


def _run_length_bias(args: argparse.Namespace) -> int:
    from rstar_batch.base import fs as fsio
    from rstar_batch.length_bias import length_bias, plot_length_bias

    report = length_bias(args.output, args.candidates, doc_id_column=args.doc_id_column,
                         passage_column=args.passage_column, unit=args.unit)
    print(report.text())
    if args.json:
        fs, path = fsio.resolve(args.json)
        fsio.write_json(fs, path, report.to_dict())
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot_length_bias(report, args.plot)
        except ImportError as exc:
            print(f"rstar-batch: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from rstar_batch.export import export_trec

    lines = export_trec(args.output, args.target, tag=args.tag)
    print(f"wrote {lines} lines to {args.target}")
    return 0


def _run_cache(args: argparse.Namespace) -> int:
    from rstar_batch.cache.compact import compact

    if args.keep_days is not None and args.keep_days < 0:
        raise ConfigError(f"--keep-days must be 0 or more, got {args.keep_days}")
    for report in compact(args.uri, keep_days=args.keep_days):
        print(f"score cache key {report['key']}: {report['records_before']} record(s), "
              f"{report['entries_before']} entries → {report.get('records_after', 0)} "
              f"record(s), {report.get('entries_after', 0)} entries; "
              f"{report['deleted_files']} file(s) no longer used deleted")
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from rstar_batch.io.convert import convert

    print(convert(args.format, args.input, args.output, int_ids=args.int_ids,
                  max_bad_lines=args.max_bad_lines).line())
    return 0


COMMANDS = {"rerank": _run_rerank, "score-corpus": _run_score_corpus,
            "tokenize-corpus": _run_tokenize_corpus, "status": _run_status,
            "sample-data": _run_sample, "make-tiny-model": _run_tiny, "demo": _run_demo,
            "evaluate": _run_evaluate, "export": _run_export, "length-bias": _run_length_bias,
            "convert": _run_convert, "cache": _run_cache}


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user must fix: reported in one line, exit code 2, no traceback."""
    from rstar_batch.progress.checkpoint import OutputError
    from rstar_batch.io.sources import InputError
    from rstar_batch.model import ModelUnavailableError
    from rstar_batch.summary import TooManyRejectedError
    from rstar_batch.cache.store import CacheError

    return (ConfigError, InputError, OutputError, ModelUnavailableError, TooManyRejectedError,
            CacheError)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is logged, not when configured."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_process(log_level: str) -> None:
    """Logging to stderr and quiet tokenizer threads, for every entrypoint."""
    logging.basicConfig(level=log_level, handlers=[_StderrHandler()],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if log_level != "DEBUG":  # one line per S3 client about where credentials came from
        for name in ("botocore", "aiobotocore", "s3fs"):
            logging.getLogger(name).setLevel(logging.WARNING)


JOBS = ("rerank", "score-corpus", "tokenize-corpus")  # what may start a Ray of its own


def report_stop(args: argparse.Namespace, signal_name: str) -> int:
    """A watcher's report for a job whose driver died after a stop was asked: what
    the output says is committed, as the driver would have said it."""
    from rstar_batch.status import job_status

    try:
        status = job_status(config_from_args(args).output)
    except Exception as exc:  # the watcher still exits as a stopped job
        print(f"rstar-batch: stopped on {signal_name}; what is committed could not be read "
              f"({type(exc).__name__}: {exc}); rerun the same command to resume")
        return EXIT_STOPPED
    if status.state == "DONE":
        print(f"rstar-batch: finished before the stop: {status.summary}")
        return 0
    print(f"rstar-batch: {Stopped.on(signal_name, status.done, status.total)}")
    return EXIT_STOPPED


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_process(args.log_level)
    if argv is None and args.command in JOBS:
        if supervise.wanted(getattr(args, "address", None)):
            return supervise.watch(lambda name: report_stop(args, name),  # supervise.py
                                   drain_s=lambda: config_from_args(args).drain_seconds)
        watch_from_the_start()  # a stop while it imports and checks: it stops, says so
    try:
        return COMMANDS[args.command](args)
    except user_errors() as exc:
        print(f"rstar-batch: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:  # SIGTERM or SIGINT drained the job
        print(f"rstar-batch: {exc}")
        return EXIT_STOPPED
