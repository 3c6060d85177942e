#!/usr/bin/env python3
"""Reads records the agent wrote back through the official `chromadb` client and checks them.

Proves the record format outside Rust: every `full_embeddings` is decoded the way DocuSearch's
search engine does it (shape from `embedding_shape`, encoding from `multivector_encoding`,
`f32-gzip-b64` when absent) and compared with the multi-vector the writer used.

Usage: check_records.py EXPECT.json
EXPECT.json: {"host": ..., "port": ..., "tenant": ..., "database": ...,
              "records": [{"collection": ..., "id": ..., "type": "visual"|"text",
                           "rows": n, "dim": d, "raw_f32": "path of little-endian f32 values"}]}
Prints one JSON line with what was checked; exits 1 on the first mismatch.
"""

import ast
import base64
import gzip
import json
import sys

import chromadb
import numpy as np

DOCUSEARCH_KEYS = [
    "doc_id", "type", "filename", "source_path", "page", "num_pages", "format", "timestamp",
    "full_embeddings", "embedding_shape", "seq_length",
]
TEXT_KEYS = ["chunk_id", "full_text", "text_preview", "word_count"]
OUR_KEYS = ["content_hash", "agent_id", "model", "multivector_encoding", "schema_version"]


def decode_full_embeddings(meta):
    """What a DocuSearch reader does with a record's metadata."""
    shape = ast.literal_eval(meta["embedding_shape"])
    encoding = meta.get("multivector_encoding") or "f32-gzip-b64"
    raw = base64.b64decode(meta["full_embeddings"])
    if encoding == "f32-gzip-b64":
        values = np.frombuffer(gzip.decompress(raw), dtype="<f4")
    elif encoding == "f16-b64":
        values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:
        raise ValueError(f"unknown multivector_encoding {encoding!r}")
    return values.reshape(shape), encoding


def fail(msg):
    print(f"check_records: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    expect = json.load(open(sys.argv[1]))
    client = chromadb.HttpClient(
        host=expect["host"], port=expect["port"],
        tenant=expect["tenant"], database=expect["database"],
    )
    by_collection = {}
    for r in expect["records"]:
        by_collection.setdefault(r["collection"], []).append(r)
    checked = {"f32-gzip-b64": 0, "f16-b64": 0}
    for name, wanted in by_collection.items():
        col = client.get_collection(name)
        space = (col.configuration_json or {}).get("hnsw", {}).get("space")
        if space != "cosine":
            fail(f"collection {name} has space {space!r}, expected cosine")
        got = col.get(ids=[r["id"] for r in wanted], include=["metadatas", "documents", "embeddings"])
        index = {rid: i for i, rid in enumerate(got["ids"])}
        for r in wanted:
            if r["id"] not in index:
                fail(f"record {r['id']} is not in {name}")
            i = index[r["id"]]
            meta = got["metadatas"][i]
            keys = DOCUSEARCH_KEYS + OUR_KEYS + (TEXT_KEYS if r["type"] == "text" else [])
            missing = [k for k in keys if k not in meta]
            if missing:
                fail(f"record {r['id']} lacks metadata keys {missing}")
            if meta["type"] != r["type"]:
                fail(f"record {r['id']} has type {meta['type']!r}, expected {r['type']!r}")
            if not r["id"].startswith(meta["doc_id"]):
                fail(f"record {r['id']} has doc_id {meta['doc_id']!r}")
            mv, encoding = decode_full_embeddings(meta)
            if mv.shape != (r["rows"], r["dim"]) or meta["seq_length"] != r["rows"]:
                fail(f"record {r['id']}: shape {mv.shape}, seq_length {meta['seq_length']}, expected ({r['rows']}, {r['dim']})")
            original = np.fromfile(r["raw_f32"], dtype="<f4").reshape(r["rows"], r["dim"])
            expected = original if encoding == "f32-gzip-b64" else original.astype(np.float16).astype(np.float32)
            if not np.array_equal(mv.view(np.uint32), expected.view(np.uint32)):
                bad = int(np.sum(mv.view(np.uint32) != expected.view(np.uint32)))
                fail(f"record {r['id']}: {bad} values differ from what was written ({encoding})")
            mean = original.mean(axis=0)
            mean = mean / np.linalg.norm(mean)
            if not np.allclose(np.asarray(got["embeddings"][i]), mean, atol=1e-5):
                fail(f"record {r['id']}: the record embedding is not the L2-normalised mean of its rows")
            if got["documents"][i] is None:
                fail(f"record {r['id']} has no document text")
            checked[encoding] += 1
    print(json.dumps({"ok": True, "checked": checked, "chromadb": chromadb.__version__}))


if __name__ == "__main__":
    main()
