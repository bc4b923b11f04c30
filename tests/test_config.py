"""One config for CLI, YAML and Python: precedence, validation, documentation."""

from __future__ import annotations

import dataclasses

import pytest

from rstar_batch.cli import build_parser, config_from_args
from rstar_batch.config import ConfigError, RerankConfig


def _parse(*argv: str) -> RerankConfig:
    return config_from_args(build_parser().parse_args(["rerank", *argv]))


def test_command_line_overrides_the_yaml_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("candidates: [in/a.parquet, in/b.parquet]\noutput: out\ntop_k: 10\n"
                    "keep_columns: [title]\ndtype: float16\n")
    cfg = _parse("--config", str(path), "--top-k", "3", "--output", "other")
    assert cfg.candidates == ["in/a.parquet", "in/b.parquet"]
    assert (cfg.top_k, cfg.output, cfg.keep_columns, cfg.dtype) == (3, "other", ["title"],
                                                                      "float16")


def test_flags_set_every_kind_of_field():
    cfg = _parse("--candidates", "a", "b", "--output", "o", "--overwrite",
                 "--max-replicas", "4", "--gpus-per-replica", "0.5", "--device", "cuda")
    assert cfg.candidates == ["a", "b"] and cfg.overwrite is True
    assert (cfg.max_replicas, cfg.gpus_per_replica, cfg.device) == (4, 0.5, "cuda")


def test_unknown_yaml_key_names_the_closest_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("candidates: [x]\noutput: o\ntopk: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'topk' \(did you mean 'top_k'\?\)"):
        RerankConfig.from_yaml(str(path))


@pytest.mark.parametrize("changes,message", [
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(dtype="fp8"), "dtype must be one of auto, float32, float16, bfloat16"),
    (dict(min_replicas=3, max_replicas=2), "below min_replicas"),
    (dict(query_column="doc_id"), "must differ"),
    (dict(keep_columns=["score"]), "output columns"),
])
def test_bad_values_are_refused_with_the_field_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        RerankConfig(candidates=["x"], output="o", **changes)


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["rerank", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(RerankConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "(default: jaspercatapang/R-star)" in text
    assert "(default: 512)" in text


def test_yaml_round_trip_keeps_every_field(tmp_path):
    cfg = RerankConfig(candidates=["a"], output="o", top_k=5, keep_columns=["t"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert RerankConfig.from_yaml(str(path)) == cfg
