"""The demo: sample data → the full rerank job on a local Ray → a look at one query."""

from __future__ import annotations

import os
from typing import Optional

import pyarrow.compute as pc
import pyarrow.parquet as pq

from rstar_batch.config import DEFAULT_MODEL, RerankConfig
from rstar_batch.pipeline import rerank
from rstar_batch.testing import default_tiny_model_dir, make_tiny_model, write_sample_data


def run_demo(workdir: str, model: Optional[str] = None, tiny: bool = False) -> None:
    if tiny:
        model = make_tiny_model(default_tiny_model_dir())
        print(f"using the tiny random-weight model at {model} (scores are meaningless)")
    candidates = os.path.join(workdir, "candidates")
    output = os.path.join(workdir, "ranked")
    write_sample_data(candidates, num_queries=20, candidates_per_query=50)
    summary = rerank(RerankConfig(candidates=[candidates], output=output,
                                  model=model or DEFAULT_MODEL,
                                  keep_columns=["query", "passage"], overwrite=True))
    print(summary.line())
    print(f"ranked output: {os.path.abspath(output)}")
    table = pq.read_table(output)
    first = table.filter(pc.equal(table["query_id"], table["query_id"][0]))
    first = first.sort_by("rank").slice(0, 3).to_pylist()
    print(f"top 3 for query {first[0]['query_id']}: {first[0]['query']!r}")
    for row in first:
        text = row["passage"] if len(row["passage"]) <= 100 else row["passage"][:97] + "..."
        print(f"  {row['rank']}. {row['doc_id']}  score={row['score']:.4f}  {text}")
