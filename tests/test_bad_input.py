"""Every bad input stops the job before scoring, with a message naming what to fix."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rstar_batch.cli import main


def _write(path, **columns) -> str:
    pq.write_table(pa.table(columns), str(path))
    return str(path)


def _good(path) -> str:
    return _write(path, query_id=[1], query=["q"], doc_id=["d"], passage=["p"])


def _error(capsys, *argv: str) -> str:
    assert main(["rerank", *argv]) == 2
    err = capsys.readouterr().err  # log lines may come first
    assert "rstar-batch: error: " in err
    return err[err.index("rstar-batch: error: "):]


def test_missing_column_names_file_and_column(tmp_path, micro_model, capsys):
    path = _write(tmp_path / "c.parquet", query_id=[1], query=["q"], doc_id=["d"], text=["p"])
    err = _error(capsys, "--candidates", path, "--output", str(tmp_path / "o"),
                 "--model", micro_model)
    assert f"'{path}'" in err and "no passage column 'passage'" in err
    assert "--passage-column" in err and "text" in err


def test_wrong_column_type_names_file_column_and_type(tmp_path, micro_model, capsys):
    path = _write(tmp_path / "c.parquet", query_id=[1], query=["q"], doc_id=["d"], passage=[7])
    err = _error(capsys, "--candidates", path, "--output", str(tmp_path / "o"),
                 "--model", micro_model)
    assert "column 'passage'" in err and f"'{path}'" in err
    assert "int64" in err and "must be a string" in err


def test_id_types_that_differ_between_files_are_refused(tmp_path, micro_model, capsys):
    a = _good(tmp_path / "a.parquet")
    b = _write(tmp_path / "b.parquet", query_id=["1"], query=["q"], doc_id=["d"], passage=["p"])
    err = _error(capsys, "--candidates", a, b, "--output", str(tmp_path / "o"),
                 "--model", micro_model)
    assert "column 'query_id'" in err and "b.parquet" in err and "a.parquet" in err


def test_input_path_that_does_not_exist(tmp_path, micro_model, capsys):
    missing = str(tmp_path / "nope" / "*.parquet")
    err = _error(capsys, "--candidates", str(tmp_path / "nope"), "--output",
                 str(tmp_path / "o"), "--model", micro_model)
    assert "candidates path" in err and "nope" in err and "does not exist" in err
    err = _error(capsys, "--candidates", missing, "--output", str(tmp_path / "o"),
                 "--model", micro_model)
    assert "matches no files" in err


def test_input_with_no_rows(tmp_path, micro_model, capsys):
    table = pa.table({"query_id": pa.array([], pa.int64()), "query": pa.array([], pa.string()),
                      "doc_id": pa.array([], pa.string()), "passage": pa.array([], pa.string())})
    pq.write_table(table, str(tmp_path / "empty.parquet"))
    err = _error(capsys, "--candidates", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--model", micro_model)
    assert "hold no rows" in err and "1 file(s), 0 rows" in err


def test_file_that_is_not_parquet(tmp_path, micro_model, capsys):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet at all")
    err = _error(capsys, "--candidates", str(bad), "--output", str(tmp_path / "o"),
                 "--model", micro_model)
    assert f"'{bad}' is not a readable Parquet file" in err


def test_output_holding_foreign_files_is_refused_unless_overwrite(tmp_path, micro_model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.csv").write_text("keep me")
    err = _error(capsys, "--candidates", _good(tmp_path / "c.parquet"), "--output", str(out),
                 "--model", micro_model)
    assert "already holds 1 file(s) this tool did not write" in err
    assert "precious.csv" in err and "--overwrite" in err
    assert (out / "precious.csv").read_text() == "keep me"
    # --overwrite: the job deletes them and takes the folder (before Ray starts)
    import pyarrow.fs as pafs

    from rstar_batch.progress.checkpoint import MARKER, open_job
    opened = open_job(pafs.LocalFileSystem(), str(out), str(out), {"plan": 1}, overwrite=True)
    assert opened.run == 1 and not (out / "precious.csv").exists()
    assert (out / MARKER).exists()


def test_status_of_a_folder_this_tool_did_not_write_says_so(tmp_path, capsys):
    (tmp_path / "precious.csv").write_text("keep me")
    assert main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().out.strip() == f"{tmp_path}: not an rstar-batch output"
    assert (tmp_path / "precious.csv").read_text() == "keep me"


def test_unreachable_hub_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.monotonic()
    err = _error(capsys, "--candidates", _good(tmp_path / "c.parquet"), "--output",
                 str(tmp_path / "o"), "--model", "jaspercatapang/R-star")
    assert time.monotonic() - started < 30
    assert err.count("\n") == 1
    assert "cannot reach the Hugging Face hub" in err and "--model /path/to/model" in err
    assert not os.path.exists(tmp_path / "o")


def test_missing_model_folder(tmp_path, capsys):
    err = _error(capsys, "--candidates", _good(tmp_path / "c.parquet"), "--output",
                 str(tmp_path / "o"), "--model", str(tmp_path / "no-model"))
    assert "model folder" in err and "does not exist" in err


@pytest.mark.parametrize("keep", ["query_id", "doc_id"])
def test_keeping_an_id_column_is_refused(tmp_path, micro_model, capsys, keep):
    err = _error(capsys, "--candidates", _good(tmp_path / "c.parquet"), "--output",
                 str(tmp_path / "o"), "--model", micro_model, "--keep-columns", keep)
    assert "ids are always in the output" in err
