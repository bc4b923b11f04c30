"""Tokenize: (query, passage) → input ids, on CPU actors.

Exactly the pair encoding of `tokenizer(query, passage, truncation=True,
max_length=N)`, done for a whole batch at once. Texts of rejected rows are kept
(for the rejected-rows table); texts of scored rows are dropped here, so only
token ids travel to the GPUs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch.model import ModelInfo, load_tokenizer
from rstar_batch.stages import columns as C


def list_array(rows: list[list[int]], value_type: pa.DataType) -> pa.ListArray:
    """Build a list<value_type> array from Python lists without per-row Arrow calls."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for r in rows for t in r), dtype=value_type.to_pandas_dtype(),
                       count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, value_type))


class Tokenize:
    """Callable class for `map_batches`: loads the tokenizer once per actor."""

    def __init__(self, model: ModelInfo, max_length: int, trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self.max_length = max_length
        self.with_types = "token_type_ids" in self.tokenizer.model_input_names

    def encode(self, queries: list[str], passages: list[str]) -> dict[str, list[list[int]]]:
        """Encode pairs exactly as `tokenizer(query, passage, ...)` does one at a time.

        transformers treats an empty-string passage as no passage at all
        ([CLS] query [SEP]), while a batch call would add a second [SEP]; those
        rows are encoded alone so both paths give the same ids and scores.
        """
        args = dict(truncation=True, max_length=self.max_length, return_attention_mask=False,
                    return_token_type_ids=self.with_types)
        enc = dict(self.tokenizer(queries, passages, **args))
        empty = [i for i, p in enumerate(passages) if p == ""]
        if empty:
            alone = self.tokenizer([queries[i] for i in empty], **args)
            for key, rows in enc.items():
                for j, i in enumerate(empty):
                    rows[i] = alone[key][j]
        return enc

    def __call__(self, batch: pa.Table) -> pa.Table:
        scored = pc.is_null(batch[C.REJECT]).to_numpy(zero_copy_only=False)
        index = np.flatnonzero(scored)
        ids: list[list[int]] = [[] for _ in range(batch.num_rows)]
        types: list[list[int]] = [[] for _ in range(batch.num_rows)]
        if len(index):
            queries = batch[C.QUERY].take(index).to_pylist()
            passages = batch[C.PASSAGE].take(index).to_pylist()
            enc = self.encode(queries, passages)
            for j, i in enumerate(index):
                ids[i] = enc["input_ids"][j]
                if self.with_types:
                    types[i] = enc["token_type_ids"][j]
        keep_text = pa.array(~scored)
        out = batch.set_column(batch.schema.get_field_index(C.QUERY), C.QUERY,
                               pc.if_else(keep_text, batch[C.QUERY], None))
        out = out.set_column(out.schema.get_field_index(C.PASSAGE), C.PASSAGE,
                             pc.if_else(keep_text, out[C.PASSAGE], None))
        out = out.append_column(C.INPUT_IDS, list_array(ids, pa.int32()))
        if self.with_types:
            out = out.append_column(C.TOKEN_TYPE_IDS, list_array(types, pa.int8()))
        return out
