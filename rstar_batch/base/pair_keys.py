"""Pair keys: what names a pair's score in the score cache.

A score is a pure function of the pair's two texts, the model and the scoring config.
The model and config name the cache's folder (cache/store.py); the key names the pair
within it. Each text is hashed once per batch however many pairs share it (a query
meets tens to thousands of passages): 16 bytes of BLAKE2b (a fixed, specified function,
the same in every Python) over the exact query text, and over the exact passage, each
in its own domain (`Q`, `P`; a tokenized corpus's passage ids and empty flag in `I`, so
a text key never equals an ids key). The pair's key combines the two, the passage's
64-bit halves swapped: q ⊕ swap(p). Ids do not enter the key: the same texts under
other ids reuse the score, and a passage edited under the same doc_id is a new key.

Collisions: two distinct pairs collide only if their texts' hashes do (2^-128 each) or
if q1 ⊕ q2 = swap(p1) ⊕ swap(p2) for four independent random values (2^-128 per two
pairs): a cache of 10^12 entries has a collision chance of about 10^-15.
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
SCHEME = "blake2b-128, query xor swapped passage/v2"
_QUERY, _PASSAGE, _IDS = b"Q", b"P", b"I"


def key_bytes(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Keys (none null) as numpy 16-byte voids, without a copy: compared, sorted,
    deduplicated and searched as bytes."""
    keys = _array(keys)
    data = np.frombuffer(keys.buffers()[1], dtype=f"V{KEY_BYTES}")
    return data[keys.offset:keys.offset + len(keys)]


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def text_keys(queries: pa.Array | pa.ChunkedArray,
              passages: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The key of each (query, passage) text pair; null where either is null."""
    queries, passages = _array(queries), _array(passages)
    return _combine(_text_digests(queries, _QUERY),
                    _text_digests(passages, _PASSAGE, each_distinct_once=False),
                    pc.and_(pc.is_valid(queries), pc.is_valid(passages)))


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
    valid = pc.is_valid(passage_ids).to_numpy(zero_copy_only=False)
    passages = _digests(len(passage_ids), np.flatnonzero(valid).tolist(), _IDS, lambda i: bytes(
        data[(offsets[i] - start) * 4:(offsets[i + 1] - start) * 4]) + (
        b"\x01" if flags[i] else b"\x00"))
    return _combine(_text_digests(queries, _QUERY), passages,
                    pc.and_(pc.is_valid(queries), pc.is_valid(passage_ids)))


def _text_digests(texts: pa.Array, domain: bytes, each_distinct_once: bool = True
                  ) -> np.ndarray:
    """Each row's digest as two uint64 (zeros where null); `each_distinct_once`: each
    distinct text hashed once (queries: few, each in many rows; passages are mostly
    distinct within a batch, where finding the distinct ones costs what hashing does)."""
    if not each_distinct_once:
        rows = texts.cast(pa.large_string())
        offsets = np.frombuffer(rows.buffers()[1], dtype=np.int64)[
            rows.offset:rows.offset + len(rows) + 1].tolist()
        data = memoryview(rows.buffers()[2] or b"")
        valid = pc.is_valid(rows).to_numpy(zero_copy_only=False)
        return _digests(len(rows), np.flatnonzero(valid).tolist(), domain,
                        lambda i: data[offsets[i]:offsets[i + 1]])
    encoded = pc.dictionary_encode(texts)
    distinct = encoded.dictionary.cast(pa.large_string())
    offsets = np.frombuffer(distinct.buffers()[1], dtype=np.int64)[
        distinct.offset:distinct.offset + len(distinct) + 1].tolist()
    data = memoryview(distinct.buffers()[2] or b"")
    digests = _digests(len(distinct), range(len(distinct)), domain,
                       lambda i: data[offsets[i]:offsets[i + 1]])
    if not len(distinct):
        return np.zeros((len(texts), 2), np.uint64)
    return digests[pc.fill_null(encoded.indices, 0).to_numpy()]


def _digests(n: int, rows, domain: bytes, value: Callable[[int], bytes]) -> np.ndarray:
    out = bytearray(n * KEY_BYTES)
    blake = hashlib.blake2b
    for i in rows:
        out[i * KEY_BYTES:(i + 1) * KEY_BYTES] = blake(
            b"%s%s" % (domain, value(i)), digest_size=KEY_BYTES).digest()
    return np.frombuffer(bytes(out), dtype="<u8").reshape(n, 2)


def _combine(query: np.ndarray, passage: np.ndarray, valid: pa.Array) -> pa.Array:
    keys = np.ascontiguousarray(query ^ passage[:, ::-1])
    mask = valid.to_numpy(zero_copy_only=False)
    bitmap = None if mask.all() else pa.array(mask).buffers()[1]
    return pa.Array.from_buffers(KEY_TYPE, len(mask), [bitmap, pa.py_buffer(keys.tobytes())])


def key_buckets(keys: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """The cache bucket of each (non-null) key: its first 8 bytes, little-endian, mod
    `buckets` (a null key gets bucket 0: callers keep only valid keys)."""
    keys = _array(keys)
    raw = np.frombuffer(keys.buffers()[1], dtype=np.uint8)[
        keys.offset * KEY_BYTES:(keys.offset + len(keys)) * KEY_BYTES]
    first = raw.reshape(-1, KEY_BYTES)[:, :8].copy().view("<u8").ravel()
    return (first % np.uint64(buckets)).astype(np.int32)
