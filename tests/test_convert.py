"""`rstar-batch convert`: each text format to Parquet, bad lines, compression, streaming.

Each sample holds the hard cases of its format: a tab inside the last text field,
quotes, an invalid UTF-8 byte, CRLF line endings and malformed lines.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rstar_batch.cli import build_parser, main
from rstar_batch.io.convert import FORMATS, BadLineError, convert, rejected_path

BAD = "\ufffd"
SAMPLES = {  # format -> (input bytes, expected rows, expected rejected (line, reason))
    "collection": (
        b"\xef\xbb\xbf1\tplain passage\n"                    # a BOM is not part of the id
        b'2\tsays "hi" and\ttabs\t\r\n'                     # tabs and quotes kept; CR dropped
        b"3\tbad \xff byte\n"
        b"no-tab-here\n"                                    # line 4: one field
        b"\tno id\n"                                        # line 5: empty id
        b'6\t"unclosed quote\n'
        b"7\tcarriage\rreturn inside\n",
        [("1", "plain passage"), ("2", 'says "hi" and\ttabs\t'), ("3", f"bad {BAD} byte"),
         ("6", '"unclosed quote'), ("7", "carriage\rreturn inside")],
        [(4, "wrong number of fields"), (5, "empty doc_id")]),
    "queries": (
        b'10\twhat is "rstar"?\r\n'
        b"11\ttab\there\n"
        b"12\t\xc3\x28 invalid\n"
        b"13\n"                                             # line 4: one field
        b"14\tlast line, no newline",
        [("10", 'what is "rstar"?'), ("11", "tab\there"), ("12", f"{BAD}( invalid"),
         ("14", "last line, no newline")],
        [(4, "wrong number of fields")]),
    "top1000": (
        b'1\t10\twhat is "x"?\tpassage with\ttab\r\n'
        b"1\t11\tq\tbad \xfe\n"
        b"2\t12\tonly three\n"                              # line 3: three fields
        b"2\t\tq\tp\n"                                      # line 4: empty doc id
        b'3\t13\t"q\t"p"\n',
        [("1", "10", 'what is "x"?', "passage with\ttab"), ("1", "11", "q", f"bad {BAD}"),
         ("3", "13", '"q', '"p"')],
        [(3, "wrong number of fields"), (4, "empty doc_id")]),
    "trec-run": (
        b"1 Q0 d1 1 12.5 bm25\r\n"
        b'1\tQ0\td"2\t2\t11\t"tag"\n'                       # tabs separate too
        b"1 Q0 d\xff3 3 -1e3 bm25\n"
        b"2 Q0 d4 x 9.0 bm25\n"                             # line 4: rank
        b"2 Q0 d5 1 high bm25\n"                            # line 5: score
        b"2 Q0 d6 1 2.0\n"                                  # line 6: five fields
        b"\n"                                               # line 7: blank, skipped
        b"3 Q0 d7 99999999999 1.0 t\n",                     # line 8: rank beyond int32
        [("1", "d1", 1, 12.5, "bm25"), ("1", 'd"2', 2, 11.0, '"tag"'),
         ("1", f"d{BAD}3", 3, -1000.0, "bm25")],
        [(4, "rank not an int32"), (5, "score not a number"), (6, "wrong number of fields"),
         (8, "rank not an int32")]),
    "qrels": (
        b"1 0 d1 1\r\n"
        b'1\t0\t"d2"\t2\n'
        b"2 0 d\xff3 -1\n"
        b"2 0 d4 yes\n"                                     # line 4: relevance
        b"2 0 d5\n",                                        # line 5: three fields
        [("1", "d1", 1), ("1", '"d2"', 2), ("2", f"d{BAD}3", -1)],
        [(4, "relevance not an int32"), (5, "wrong number of fields")]),
}


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _rows(path) -> list[tuple]:
    return [tuple(row.values()) for row in pq.read_table(path).to_pylist()]


@pytest.mark.parametrize("fmt", SAMPLES)
def test_each_format_converts_with_bad_lines_set_aside(fmt, tmp_path):
    data, rows, rejected = SAMPLES[fmt]
    source = _write(tmp_path / f"{fmt}.tsv", data)
    target = str(tmp_path / "out" / f"{fmt}.parquet")
    stats = convert(fmt, source, target, max_bad_lines=10)
    assert _rows(target) == rows
    assert pq.read_schema(target) == FORMATS[fmt].schema()
    bad = pq.read_table(rejected_path(target)).to_pylist()
    assert [(r["line"], r["reason"]) for r in bad] == rejected
    lines = data.decode("utf-8", errors="replace").split("\n")
    assert all(r["raw"] == lines[r["line"] - 1].rstrip("\r") for r in bad)
    assert stats.rows == len(rows) and stats.invalid_utf8_lines == 1
    assert sum(stats.bad_lines.values()) == len(rejected)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [f"{fmt}.parquet", f"_{fmt}.rejected.parquet"])          # no temporary files left


@pytest.mark.parametrize("fmt", SAMPLES)
def test_first_bad_line_fails_naming_file_line_and_reason(fmt, tmp_path):
    data, _, rejected = SAMPLES[fmt]
    source = _write(tmp_path / f"{fmt}.tsv", data)
    line, reason = rejected[0]
    with pytest.raises(BadLineError, match=rf"{fmt}\.tsv, line {line}: .*\({reason}\)"):
        convert(fmt, source, str(tmp_path / "out.parquet"), block_rows=1)  # rows written first
    assert os.listdir(tmp_path) == [f"{fmt}.tsv"]                # nothing that looks complete


def test_too_many_bad_lines_fail_and_leave_nothing(tmp_path):
    source = _write(tmp_path / "run.txt", SAMPLES["trec-run"][0])
    with pytest.raises(BadLineError, match=r"more than 3 bad lines .* line 8: "):
        convert("trec-run", source, str(tmp_path / "run.parquet"), max_bad_lines=3)
    assert os.listdir(tmp_path) == ["run.txt"]


def test_clean_rerun_removes_the_stale_rejected_file(tmp_path):
    target = str(tmp_path / "q.parquet")
    convert("queries", _write(tmp_path / "q.tsv", b"1\ta\n2\n"), target, max_bad_lines=1)
    assert os.path.exists(rejected_path(target))
    stats = convert("queries", _write(tmp_path / "q.tsv", b"1\ta\n2\tb\n"), target)
    assert stats.rejected is None and not os.path.exists(rejected_path(target))
    assert _rows(target) == [("1", "a"), ("2", "b")]


def test_int_ids_from_the_command_line(tmp_path, capsys):
    source = _write(tmp_path / "top.tsv", b"1\t10\tq\tp\n2\tx7\tq\tp\n3\t30\tq\tp\tmore\n")
    target = str(tmp_path / "top.parquet")
    assert main(["convert", "top1000", source, target, "--int-ids",
                 "--max-bad-lines", "1"]) == 0
    table = pq.read_table(target)
    assert table.schema.field("query_id").type == pa.int64() == table["doc_id"].type
    assert _rows(target) == [(1, 10, "q", "p"), (3, 30, "q", "p\tmore")]
    assert pq.read_table(rejected_path(target))["reason"].to_pylist() == [
        "doc_id not an int64"]
    out = capsys.readouterr().out
    assert "wrote 2 rows" in out and "bad lines: 1 (doc_id not an int64: 1)" in out
    assert main(["convert", "top1000", source, target, "--int-ids"]) == 2
    assert "top.tsv, line 2: " in capsys.readouterr().err


def test_cli_offers_exactly_the_formats():
    convert_parser = build_parser()._subparsers._group_actions[0].choices["convert"]
    choices = next(a.choices for a in convert_parser._actions if a.dest == "format")
    assert list(choices) == list(FORMATS)


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("suffix,pack", [(".gz", gzip.compress), (".bz2", bz2.compress),
                                         (".xz", lzma.compress), (".zst", _zstd)])
def test_compressed_input_is_unpacked_by_extension(suffix, pack, tmp_path):
    data, rows, _ = SAMPLES["qrels"]
    source = _write(tmp_path / f"qrels.txt{suffix}", pack(data))
    convert("qrels", source, str(tmp_path / "q.parquet"), max_bad_lines=2)
    assert _rows(tmp_path / "q.parquet") == rows


def test_fsspec_uris_in_and_out(tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/convert-test/queries.tsv", b"1\tone\n2\ttwo\n")
    stats = convert("queries", "memory://convert-test/queries.tsv",
                    "memory://convert-test/out/queries.parquet")
    with memory.open("/convert-test/out/queries.parquet", "rb") as f:
        assert _rows(f) == [("1", "one"), ("2", "two")]
    assert stats.rows == 2
    memory.rm("/convert-test", recursive=True)


def test_refuses_a_folder_output_and_a_missing_input(tmp_path):
    source = _write(tmp_path / "c.tsv", b"1\ta\n")
    with pytest.raises(ValueError, match="is a folder"):
        convert("collection", source, str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        convert("collection", str(tmp_path / "missing.tsv"), str(tmp_path / "x.parquet"))


MEMORY_PROBE = r"""
import json, sys, tracemalloc
import pyarrow as pa, pyarrow.parquet as pq
from rstar_batch.io.convert import convert
source, target = sys.argv[1], sys.argv[2]
tracemalloc.start()
stats = convert("queries", source, target, block_rows=5_000, block_bytes=256 << 10)
print(json.dumps({"python": tracemalloc.get_traced_memory()[1],
                  "arrow": pa.default_memory_pool().max_memory(), "rows": stats.rows,
                  "row_groups": pq.ParquetFile(target).metadata.num_row_groups}))
"""


def test_big_file_streams_in_row_groups_with_bounded_memory(tmp_path):
    source = tmp_path / "queries.tsv"
    with open(source, "wb") as out:
        for start in range(0, 300_000, 50_000):
            out.write(b"".join(b"%d\tquery number %d about a thing\n" % (i, i)
                               for i in range(start, start + 50_000)))
    size = source.stat().st_size                                  # ~12 MB
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(source),
                            str(tmp_path / "q.parquet")],
                           capture_output=True, text=True, check=True, timeout=60)
    seen = json.loads(probe.stdout)
    assert seen["rows"] == 300_000 and seen["row_groups"] >= 60      # 5,000 rows or 256 KiB each
    # Reading the file whole would need more than its size in Python objects alone.
    assert seen["python"] < size / 3 and seen["arrow"] < size / 3, (seen, size)
