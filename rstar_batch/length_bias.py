"""How much a finished job's scores follow passage length.

R*'s model card warns that the cross-encoder favours longer passages. This
report joins a ranked output folder with the passages' lengths (from the job's
flat candidates or a corpus, read by doc id) and measures the bias three ways:
Spearman's rho of score and length over all pairs, its mean over queries
(within a query is what the ranking sees), and the score per length decile.

Deciles are `pandas.qcut` of the scored pairs' lengths with duplicate edges
dropped: equal lengths always share a decile, so with many ties there are
fewer than ten, of unequal sizes (splitting a tie by row order would invent
a length difference that is not there).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rstar_batch.base import fs as fsio
from rstar_batch.config import ConfigError
from rstar_batch.export import RANKED_COLUMNS, ranked_parts, read_part
from rstar_batch.io.sources import InputError, inspect_candidates

log = logging.getLogger(__name__)

UNITS = ("words", "chars")
PLOT_INSTALL = "pip install 'rstar-batch[plot]'"


@dataclasses.dataclass(frozen=True)
class Decile:
    """One length bin of the scored pairs (lengths min..max inclusive)."""

    min_length: int
    max_length: int
    pairs: int
    mean_score: float
    median_score: float


@dataclasses.dataclass(frozen=True)
class LengthBiasReport:
    """Score against passage length for one ranked output; rho is NaN where undefined."""

    output: str
    unit: str
    pairs: int
    queries: int
    pooled_spearman: float
    mean_query_spearman: float
    queries_used: int              # queries with >= 3 pairs, score and length not constant
    deciles: tuple[Decile, ...]

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None."""
        def clean(value):
            return None if isinstance(value, float) and math.isnan(value) else value
        out = {k: clean(v) for k, v in dataclasses.asdict(self).items() if k != "deciles"}
        out["deciles"] = [{k: clean(v) for k, v in dataclasses.asdict(d).items()}
                          for d in self.deciles]
        return out

    def text(self) -> str:
        """The report as aligned plain text for a terminal."""
        ranges = [f"{d.min_length}-{d.max_length}" for d in self.deciles]
        width = max([len("length"), *map(len, ranges)])
        lines = [f"length bias: {self.pairs} pairs, {self.queries} queries, unit={self.unit}",
                 f"Spearman(score, length): pooled {self.pooled_spearman:.3f}, mean per "
                 f"query {self.mean_query_spearman:.3f} ({self.queries_used} queries)",
                 f"{'decile':>6}  {'length':<{width}}  {'pairs':>8}  {'mean score':>10}  "
                 f"{'median score':>12}"]
        for i, (d, span) in enumerate(zip(self.deciles, ranges), 1):
            lines.append(f"{i:>6}  {span:<{width}}  {d.pairs:>8}  {d.mean_score:>10.3f}  "
                         f"{d.median_score:>12.3f}")
        return "\n".join(lines)


def _scored_pairs(output: str) -> pd.DataFrame:
    """query_id, doc_id (as string) and score of every ranked pair with a finite score."""
    fs, parts = ranked_parts(output)
    tables = [read_part(fs, part, RANKED_COLUMNS) for part in parts]
    if not tables or not sum(t.num_rows for t in tables):
        raise InputError(f"output '{output}' holds no ranked pairs")
    table = pa.concat_tables(tables, promote_options="permissive")
    frame = pd.DataFrame({"query_id": table["query_id"].to_pandas(),
                          "doc_id": pc.cast(table["doc_id"], pa.string()).to_pandas(),
                          "score": table["score"].to_numpy().astype(np.float64)})
    finite = np.isfinite(frame["score"].to_numpy())
    if not finite.all():
        log.warning("%s: %d pair(s) with a NaN or infinite score left out", output,
                    int((~finite).sum()))
    return frame[finite]


def _lengths(passages: pa.Array, unit: str) -> pa.Array:
    if unit == "chars":
        return pc.utf8_length(passages)
    trimmed = pc.utf8_trim_whitespace(passages)
    words = pc.list_value_length(pc.utf8_split_whitespace(trimmed))
    return pc.if_else(pc.equal(trimmed, ""), 0, words)  # "" splits into [""]


def _passage_lengths(candidates: list[str], wanted: pa.Array, doc_id_column: str,
                     passage_column: str, unit: str) -> pd.Series:
    """Length of each wanted doc id's passage (index: doc id as string).

    Only the two columns are read and only wanted ids kept, so memory holds the
    scored passages once each, not the whole corpus."""
    found = inspect_candidates(candidates, {"doc_id": doc_id_column,
                                            "passage": passage_column}, [])
    distinct = []
    for path in found.paths:
        with found.filesystem.open_input_file(path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=[doc_id_column,
                                                                  passage_column]):
                ids = pc.cast(batch.column(doc_id_column), pa.string())
                table = pa.table({"doc_id": ids, "passage": batch.column(passage_column)})
                keep = pc.and_(pc.is_in(ids, value_set=wanted),
                               pc.is_valid(table["passage"]))  # null: no length, unscored
                distinct.append(table.filter(keep).group_by(["doc_id", "passage"])
                                .aggregate([]))
    table = pa.concat_tables(distinct).group_by(["doc_id", "passage"]).aggregate([])
    counts = table.group_by("doc_id").aggregate([("passage", "count")])
    conflicts = counts.filter(pc.greater(counts["passage_count"], 1))["doc_id"]
    if len(conflicts):
        raise InputError(f"doc_id '{conflicts[0]}' has different passages in the candidates "
                         f"({', '.join(candidates)}); {len(conflicts)} doc_id(s) do. A "
                         "doc_id must name one passage")
    return pd.Series(_lengths(table["passage"], unit).to_numpy(zero_copy_only=False),
                     index=table["doc_id"].to_pandas(), dtype=np.int64)


def _spearman_by(frame: pd.DataFrame, by: str) -> pd.Series:
    """Spearman's rho of score and length within each group: the Pearson correlation
    of average ranks (ties share their mean rank). NaN where a side is constant."""
    groups = frame.groupby(by, sort=False)
    ranks = pd.DataFrame({"s": groups["score"].rank(method="average"),
                          "l": groups["length"].rank(method="average"), "k": frame[by]})
    centred = ranks[["s", "l"]] - ranks.groupby("k", sort=False)[["s", "l"]].transform("mean")
    sums = pd.DataFrame({"sl": centred["s"] * centred["l"], "ss": centred["s"] ** 2,
                         "ll": centred["l"] ** 2, "k": frame[by]}).groupby("k").sum()
    denominator = np.sqrt(sums["ss"] * sums["ll"])
    return (sums["sl"] / denominator).where(denominator > 0)


def _deciles(frame: pd.DataFrame) -> tuple[Decile, ...]:
    if frame["length"].nunique() > 1:
        bins = pd.qcut(frame["length"], 10, labels=False, duplicates="drop")
    else:
        bins = pd.Series(0, index=frame.index)
    stats = frame.groupby(bins).agg(min_length=("length", "min"), max_length=("length", "max"),
                                    pairs=("score", "size"), mean_score=("score", "mean"),
                                    median_score=("score", "median"))
    return tuple(Decile(int(r.min_length), int(r.max_length), int(r.pairs),
                        float(r.mean_score), float(r.median_score))
                 for r in stats.itertuples())


def length_bias(output: str, candidates: list[str], doc_id_column: str = "doc_id",
                passage_column: str = "passage", unit: str = "words") -> LengthBiasReport:
    """Measure how the scores in ranked `output` follow the length (in `unit`: whitespace
    words or characters) of each doc id's passage in `candidates`."""
    if unit not in UNITS:
        raise ConfigError(f"unit '{unit}' is not one of {', '.join(UNITS)}")
    candidates = [candidates] if isinstance(candidates, str) else list(candidates)
    pairs = _scored_pairs(output)
    wanted = pd.Index(pairs["doc_id"].unique())
    lengths = _passage_lengths(candidates, pa.array(wanted, pa.string()), doc_id_column,
                               passage_column, unit)
    missing = wanted.difference(lengths.index)
    if len(missing):
        raise InputError(f"{len(missing)} scored doc_id(s) have no passage in the candidates "
                         f"{', '.join(candidates)} (e.g. '{missing[0]}'); give the job's "
                         "candidates or the corpus it was joined with")
    pairs = pairs.assign(length=pairs["doc_id"].map(lengths))
    per_query = _spearman_by(pairs[pairs.groupby("query_id")["score"].transform("size") >= 3],
                             "query_id").dropna()
    pooled = _spearman_by(pairs.assign(all=0), "all").iloc[0]
    log.info("length bias of %s: %d pairs, pooled Spearman %.3f", output, len(pairs), pooled)
    return LengthBiasReport(output, unit, len(pairs), int(pairs["query_id"].nunique()),
                            float(pooled), float(per_query.mean()),  # NaN if none used
                            len(per_query), _deciles(pairs))


def plot_length_bias(report: LengthBiasReport, path: str) -> None:
    """Write a PNG of mean and median score per length decile to `path` (local or URI)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: no global backend state
    except ImportError:
        raise ImportError(f"plot_length_bias needs matplotlib; install it with "
                          f"{PLOT_INSTALL}") from None
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    x = np.arange(len(report.deciles))
    axes.plot(x, [d.mean_score for d in report.deciles], marker="o", label="mean score")
    axes.plot(x, [d.median_score for d in report.deciles], marker="s", linestyle="--",
              label="median score")
    axes.set_xticks(x, [f"{d.min_length}-{d.max_length}" for d in report.deciles],
                    rotation=30)
    axes.set_xlabel(f"passage length ({report.unit}), by decile")
    axes.set_ylabel("score")
    axes.set_title(f"Score by passage length: pooled Spearman "
                   f"{report.pooled_spearman:.3f} ({report.pairs} pairs)")
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    fs, target = fsio.resolve(path)
    fsio.write_bytes(fs, target, buffer.getvalue())
