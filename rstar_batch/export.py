"""`rstar-batch export --format trec`: ranked output as a TREC run file.

Each line is `qid Q0 docid rank score tag`. A query's lines sit together in rank
order; the file is written one output part at a time (queries ascending within
a part), so memory holds one part, never the whole output.

trec_eval ignores the rank column: it re-sorts each query by score, read as a
32-bit float, descending, and breaks ties by doc id in *descending* string order
(`comp_sim_docno` in trec_eval's form_res_rels.c; pytrec_eval does the same).
Our ties are broken by doc id ascending, so exporting tied scores as they are
would reorder them. The exported score is therefore our float32 score, except
where it would not sort strictly below the line above it: there it becomes the
next float32 below that line's score (the smallest change that keeps our order).
Scores are printed with the fewest digits that read back as the same float32.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rstar_batch.base import fs as fsio
from rstar_batch.base.order import group_starts
from rstar_batch.config import ConfigError
from rstar_batch.progress import checkpoint

log = logging.getLogger(__name__)

RANKED_COLUMNS = ["query_id", "doc_id", "score", "rank"]
FORMATS = ("trec",)
_FLOAT32_MAX = np.finfo(np.float32).max
_GROUP_STRIDE = np.int64(1) << 36  # larger than any float32 order key plus a row position


def ranked_parts(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The ranked part files of a finished rstar-batch output folder.

    Every row of a query sits in exactly one part, so each part can be read alone.
    """
    fs, root = fsio.resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"output '{uri}' does not exist")
    if info.type != pafs.FileType.Directory or not fsio.exists(
            fs, fsio.join(root, checkpoint.MARKER)):
        raise ConfigError(f"'{uri}' is not an rstar-batch output folder (no "
                          f"{checkpoint.MARKER}); give the --output of a rerank job")
    if not fsio.exists(fs, fsio.join(root, checkpoint.SUCCESS)):
        raise ConfigError(f"output '{uri}' is not finished (no {checkpoint.SUCCESS}); "
                          "wait for the job, or rerun the same rerank command to resume it")
    parts = sorted(i.path for i in fsio.list_files(fs, root, recursive=False)
                   if i.base_name.endswith(".parquet")
                   and not i.base_name.startswith(("_", ".")))
    return fs, parts


def read_part(fs: pafs.FileSystem, path: str, columns: list[str]) -> pa.Table:
    """One part's columns, ordered by (query_id, rank)."""
    names = pq.read_schema(path, filesystem=fs).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ConfigError(f"'{path}' lacks column(s) {missing} (it has {names}); is it "
                          "an rstar-batch ranked output?")
    table = pq.read_table(path, columns=columns, filesystem=fs)
    return table.take(pc.sort_indices(table, [("query_id", "ascending"),
                                              ("rank", "ascending")]))


def _order_key(values: np.ndarray) -> np.ndarray:
    """float32 -> int64 that orders as the floats do; adjacent floats differ by 1."""
    bits = values.view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_order_key(keys: np.ndarray) -> np.ndarray:
    bits = np.where(keys < 0, (-keys) | 0x80000000, keys)
    return bits.astype(np.uint32).view(np.float32)


def trec_scores(scores: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """float32 scores that strictly decrease down each query, as close to `scores` as can be.

    Rows are in rank order, `starts` marks each query's first row. A score equal
    to (or above) the one before it is lowered to the next float32 below that
    one; all other scores are unchanged. NaN and infinite scores are first
    clipped to the float32 range.
    """
    finite = np.nan_to_num(np.asarray(scores, dtype=np.float32), nan=-_FLOAT32_MAX,
                           posinf=_FLOAT32_MAX, neginf=-_FLOAT32_MAX)
    key = _order_key(finite)
    position = np.arange(len(key), dtype=np.int64)
    offset = (np.cumsum(starts) - 1).astype(np.int64) * _GROUP_STRIDE
    # out[i] = min(key[i], out[i-1] - 1) within a query
    #        = min over the query's rows j <= i of (key[j] + j), minus i.
    # Subtracting a per-query offset keeps the running minimum inside each query.
    out = np.minimum.accumulate(key + position - offset) + offset - position
    out = np.maximum(out, _order_key(np.array([-np.inf], np.float32)))  # never past -inf
    return _from_order_key(out)


def _check_ids(ids: pa.Array, column: str, path: str) -> None:
    bad = pc.or_kleene(pc.is_null(ids), pc.match_substring_regex(ids, r"^$|\s"))
    if pc.any(bad).as_py():
        example = ids.filter(bad)[0].as_py()
        raise ConfigError(f"{column} {example!r} in '{path}' is empty, null or holds "
                          "whitespace, which a TREC run file cannot hold")


def _trec_lines(table: pa.Table, tag: str, path: str) -> str:
    qids = pc.cast(table["query_id"], pa.string())
    dids = pc.cast(table["doc_id"], pa.string())
    _check_ids(qids, "query_id", path)
    _check_ids(dids, "doc_id", path)
    starts = group_starts(qids)
    raw = table["score"].to_numpy()
    scores = trec_scores(raw, starts)
    changed = int(np.count_nonzero(scores != raw.astype(np.float32)))
    if changed:
        log.debug("%s: %d tied score(s) lowered by float32 steps", path, changed)
    lines = pc.binary_join_element_wise(
        qids, "Q0", dids, pc.cast(table["rank"], pa.string()),
        pc.cast(pa.array(scores, pa.float32()), pa.string()), tag, " ")
    return "".join(line + "\n" for line in lines.to_pylist())


def export_trec(output: str, target: str, tag: str = "rstar-batch") -> int:
    """Write the ranked output folder `output` as a TREC run file; return its lines."""
    if not tag or any(ch.isspace() for ch in tag):
        raise ConfigError(f"tag {tag!r} must be one word (no whitespace)")
    src_fs, parts = ranked_parts(output)
    fs, path = fsio.resolve(target)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = fsio.temp_path(fs, path)
    written = 0
    try:
        with fs.open_output_stream(tmp) as out:
            for part in parts:
                table = read_part(src_fs, part, RANKED_COLUMNS)
                out.write(_trec_lines(table, tag, part).encode())
                written += table.num_rows
        if tmp != path:
            fs.move(tmp, path)
    except BaseException:
        if tmp != path:
            fsio.delete(fs, tmp)
        raise
    log.info("exported %d ranked rows from %d part(s) to %s", written, len(parts), target)
    return written
