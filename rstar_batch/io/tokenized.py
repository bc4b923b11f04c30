"""A tokenized corpus: passages' token ids written once, read by every job that uses them.

    T/
      part-c00000012-0-4096.parquet …  doc_id, passage_ids (list<int32>), empty_passage
      _rejected/part-c….parquet         rows with a null doc id or passage, with a reason
      _tokenized_corpus.json            format version, tokenizer fingerprint, model, rows
      _manifest.json, _SUCCESS          as every job's output

`passage_ids` are a passage's own ids (no special tokens, not cut): exactly what
`PairAssembler.tokenize` gives for its text. So T serves any max_length and
passage policy; only the tokenizer must be the job's, which the fingerprint
checks on the driver before Ray starts. Every row of the corpus with an id and a
passage is kept, repeated ids too: rerank's join keeps one per id as it does for
a text corpus, and score-corpus refuses repeats as it does for a text corpus.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
import uuid
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from rstar_batch.base import columns as C
from rstar_batch.base import fs as fsio
from rstar_batch.base.runs import split_runs
from rstar_batch.config import ConfigError
from rstar_batch.faults import FaultHook
from rstar_batch.io.sources import CandidateFiles, InputError, inspect_candidates
from rstar_batch.model import ModelInfo
from rstar_batch.progress import checkpoint
from rstar_batch.progress import log as commit_log

FORMAT_VERSION = 1
METADATA = "_tokenized_corpus.json"
DOC_ID = C.TOKENIZED_DOC_ID
PASSAGE_IDS = C.TOKENIZED_PASSAGE_IDS
EMPTY_PASSAGE = C.TOKENIZED_EMPTY_PASSAGE
COLUMNS = (DOC_ID, PASSAGE_IDS, EMPTY_PASSAGE)
REJECTED = checkpoint.REJECTED


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What decides a text's ids: the backend tokenizer's definition and the special ids.

    The backend's truncation and padding settings are left out: transformers sets
    them on the backend while encoding, so they differ between two loads of the
    same folder once one has encoded a pair, yet they never change `tokenize`'s ids.
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    text = json.dumps(backend, sort_keys=True, ensure_ascii=False)
    parts = {"backend_sha256": hashlib.sha256(text.encode()).hexdigest(),
             "cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
             "pad_token_id": tokenizer.pad_token_id}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {**parts, "digest": "sha256:" + digest}


def read_metadata(uri: str) -> Optional[dict[str, Any]]:
    """T's metadata if `uri` is a finished tokenized corpus; None if it is not one.

    An unfinished tokenized corpus (its metadata is written just before _SUCCESS)
    is an error, not a text corpus.
    """
    fs, root = fsio.resolve(uri)
    path = fsio.join(root, METADATA)
    if not fsio.exists(fs, path):
        plan = fsio.join(checkpoint.work_dir(root), checkpoint.PLAN)
        if fsio.exists(fs, plan) and fsio.read_json(fs, plan).get("command") == "tokenize-corpus":
            raise InputError(f"corpus '{uri}' is an unfinished tokenized corpus (no {METADATA});"
                             " rerun the same tokenize-corpus command to finish it")
        return None
    if not fsio.exists(fs, fsio.join(root, checkpoint.SUCCESS)):
        raise InputError(f"tokenized corpus '{uri}' has {METADATA} but no _SUCCESS; rerun "
                         "tokenize-corpus to finish it")
    meta = fsio.read_json(fs, path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"tokenized corpus '{uri}' ({METADATA}) has format version "
                         f"{meta.get('format_version')!r}; this rstar-batch reads version "
                         f"{FORMAT_VERSION}: rerun tokenize-corpus with --restart")
    return meta


def inspect_tokenized(uri: str) -> CandidateFiles:
    """T's data files, checked like any input, plus the type of its id column."""
    files = inspect_candidates([uri], {"doc_id": DOC_ID}, [], optional=COLUMNS[1:])
    for column, kind in ((PASSAGE_IDS, pa.list_(pa.int32())), (EMPTY_PASSAGE, pa.bool_())):
        found = files.schema.field(column).type if column in files.schema.names else None
        if found != kind:
            raise InputError(f"tokenized corpus file '{files.paths[0]}' column '{column}' is "
                             f"{found or 'missing'}; it must be {kind}")
    return files


def open_tokenized(uri: Optional[str], model: ModelInfo, tokenizer: Any
                   ) -> Optional[dict[str, Any]]:
    """T's metadata, checked for this job (on the driver), or None when `uri` is a
    text corpus (or not given). Refuses T when its tokenizer is not the job's model's
    `tokenizer`. (Whether that tokenizer's pairs can be assembled from separate ids,
    the only way T's ids are used, the job checks: stages/tokenize.checked_assembler.)
    """
    meta = read_metadata(uri) if uri else None
    if meta is None:
        return None
    mine = tokenizer_fingerprint(tokenizer)
    theirs = meta["tokenizer"]
    if mine["digest"] != theirs["digest"]:
        raise ConfigError(
            f"tokenized corpus '{uri}' was tokenized for model '{meta['model']['source']}' "
            f"(tokenizer {theirs['digest']}), but this job's model '{model.source}' has "
            f"another tokenizer ({mine['digest']}); tokenize the corpus for it with "
            f"`rstar-batch tokenize-corpus --model {model.source}` or pass the text corpus")
    return meta


def pairing_clause(uri: str) -> str:
    """Why a job reading tokenized corpus `uri` needs pairs assembled from its ids."""
    return f"tokenized corpus '{uri}': its ids are paired with separately tokenized queries"


# -- writing T (tokenize-corpus's sink) -----------------------------------------------

_PART = re.compile(r"^part-c(\d+)-\d+-\d+\.parquet$")


def part_name(chunk: int, start: int, end: int) -> str:
    """T's file of rows [start, end) of a chunk: a pure function of the rows, so a
    retried batch overwrites its own file."""
    return f"part-{checkpoint.run_name(chunk, start, end)}.parquet"


class WriteTokenized:
    """`map_batches` function ending tokenize-corpus's pass: each run of a chunk's rows
    as one file of T (and one of T/_rejected/), then its commit. `sources` maps a
    chunk id to its corpus file and first row, so rejected rows name where they were."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, run: int,
                 sources: dict[int, tuple[str, int]]) -> None:
        self.filesystem, self.root, self.run, self.sources = filesystem, root, run, sources
        self.writer, self.seq = uuid.uuid4().hex[:8], itertools.count(1)
        self.fault = FaultHook.from_env()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.fault.before_batch()
        valid = pc.is_null(batch[C.REJECT]).to_numpy(zero_copy_only=False)
        done: dict[str, list[int]] = {"chunk": [], "start": [], "end": []}
        for chunk, start, end, index in split_runs(batch[C.CHUNK].to_numpy(),
                                                   batch[C.ROW].to_numpy()):
            rows = batch.take(pa.array(index))
            name = part_name(chunk, start, end)
            good = rows.filter(pa.array(valid[index]))
            if good.num_rows:
                fsio.write_table(self.filesystem, fsio.join(self.root, name), pa.table({
                    DOC_ID: good[C.DOC_ID], PASSAGE_IDS: good[C.PASSAGE_IDS],
                    EMPTY_PASSAGE: good[C.EMPTY_PASSAGE]}))
            bad = rows.filter(pa.array(~valid[index]))
            if bad.num_rows:
                path, first = self.sources[chunk]
                fsio.write_table(self.filesystem, fsio.join(self.root, REJECTED, name), pa.table({
                    DOC_ID: bad[C.DOC_ID], "passage": bad[C.PASSAGE], "reason": bad[C.REJECT],
                    "file": pa.array([path] * bad.num_rows, pa.string()),
                    "row": pc.add(bad[C.ROW].cast(pa.int64()), first)}))
            commit_log.write_commit(self.filesystem, self.root, commit_log.Commit(
                commit_log.commit_name(self.run, self.writer, next(self.seq)), self.run,
                ((chunk, start, end),), scored=int(good.num_rows), time=time.time()))
            for key, value in zip(done, (chunk, start, end)):
                done[key].append(value)
        return pa.table(done)


def drop_chunks(fs: pafs.FileSystem, root: str, chunks: set[int]) -> int:
    """Delete T's files and commits of `chunks` (a resumed run redoes them whole, so a
    partly written chunk cannot leave rows twice); return how many were deleted."""
    found = [i.path for folder in (root, fsio.join(root, REJECTED))
             for i in fsio.list_files(fs, folder, recursive=False)
             if (m := _PART.match(i.path.rsplit("/", 1)[-1])) and int(m.group(1)) in chunks]
    for path in found:
        fs.delete_file(path)
    stale = [c for c in commit_log.read_commits(fs, root)
             if any(chunk in chunks for chunk, _, _ in c.ranges)]
    commit_log.delete_commits(fs, root, stale)
    return len(found) + len(stale)


def overlapping_chunks(progress: commit_log.Progress) -> set[int]:
    """Chunks whose committed runs overlap (only a batch re-split on retry does that)."""
    bad = set()
    for chunk, ranges in progress.covered.items():
        ordered = sorted(ranges)
        if any(s < e for (_, e), (s, _) in zip(ordered, ordered[1:])):
            bad.add(chunk)
    return bad
