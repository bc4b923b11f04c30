"""Pair keys: what names a pair's score in the score cache.

A score is a pure function of the pair's two texts, the model and the scoring config.
The model and config name the cache's folder (store.py); the key names the pair within
it: 16 bytes of BLAKE2b (a fixed, specified function, the same in every Python) over
the exact query text and the exact passage, so a passage edited under the same doc_id
is a new key. With a tokenized corpus the passage is its token ids (and whether it
was empty), hashed in a domain of their own: a text key never equals an ids key.
Ids do not enter the key: the same texts under other ids reuse the score.

Collisions: 2^-128 per pair of keys; a cache of 10^12 entries has a collision chance
of about 10^-15.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEY_TYPE = pa.binary(16)
KEY_BYTES = 16
# What a key is; stored with every cache so that another scheme is another cache.
SCHEME = "blake2b-128/v1"
_TEXT, _IDS = b"T", b"I"


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def text_keys(queries: pa.Array | pa.ChunkedArray,
              passages: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The key of each (query, passage) text pair; null where either is null."""
    queries, passages = _array(queries), _array(passages)
    passage = _bytes_of(passages)
    return _keys(queries, passage, pc.is_valid(passages), _TEXT)


def id_keys(queries: pa.Array | pa.ChunkedArray, passage_ids: pa.Array | pa.ChunkedArray,
            empty: Optional[pa.Array | pa.ChunkedArray]) -> pa.Array:
    """The key of each (query text, passage token ids) pair; null where either is null."""
    queries, passage_ids = _array(queries), _array(passage_ids)
    offsets = passage_ids.offsets.to_numpy().tolist()
    values = passage_ids.values.to_numpy(zero_copy_only=False).astype("<i4", copy=False)
    data = memoryview(values.tobytes())
    flags = (np.zeros(len(queries), bool) if empty is None
             else _array(empty).to_numpy(zero_copy_only=False).astype(bool))
    start = offsets[0] if offsets else 0

    def passage(i: int) -> bytes:
        lo, hi = offsets[i] - start, offsets[i + 1] - start
        return bytes(data[lo * 4:hi * 4]) + (b"\x01" if flags[i] else b"\x00")

    return _keys(queries, passage, pc.is_valid(passage_ids), _IDS)


def _bytes_of(texts: pa.Array) -> Callable[[int], bytes]:
    """Row i's UTF-8 bytes of a string array, straight from its buffers."""
    texts = texts.cast(pa.large_string())
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[
        texts.offset:texts.offset + len(texts) + 1].tolist()
    data = memoryview(texts.buffers()[2] or b"")
    return lambda i: data[offsets[i]:offsets[i + 1]]


def _keys(queries: pa.Array, passage: Callable[[int], bytes], passage_valid: pa.Array,
          domain: bytes) -> pa.Array:
    valid = pc.and_(pc.is_valid(queries), passage_valid).to_numpy(zero_copy_only=False)
    out = bytearray(len(queries) * KEY_BYTES)
    query = _bytes_of(queries)
    blake = hashlib.blake2b
    for i in np.flatnonzero(valid).tolist():
        text = query(i)
        out[i * KEY_BYTES:(i + 1) * KEY_BYTES] = blake(
            b"%s%d:%s%s" % (domain, len(text), text, passage(i)), digest_size=KEY_BYTES).digest()
    mask = None if valid.all() else pa.array(valid).buffers()[1]
    return pa.Array.from_buffers(KEY_TYPE, len(valid), [mask, pa.py_buffer(bytes(out))])


def key_buckets(keys: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """The cache bucket of each (non-null) key: its first 8 bytes, little-endian, mod
    `buckets` (a null key gets bucket 0: callers keep only valid keys)."""
    keys = _array(keys)
    raw = np.frombuffer(keys.buffers()[1], dtype=np.uint8)[
        keys.offset * KEY_BYTES:(keys.offset + len(keys)) * KEY_BYTES]
    first = raw.reshape(-1, KEY_BYTES)[:, :8].copy().view("<u8").ravel()
    return (first % np.uint64(buckets)).astype(np.int32)
