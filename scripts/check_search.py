#!/usr/bin/env python3
"""Reference ranking for stage 2 of `search`, from colpali-engine's own `score_multi_vector`.

Writes tests/fixtures/search-reference/colpali_scores.json: one query multi-vector, 12 page
multi-vectors in the stored encoding (`f32-gzip-b64`, what DocuSearch reads) with their shapes,
and the scores and order that colpali-engine gives. The integration test
`search::ranking_equals_colpali_engine_score_multi_vector` writes those pages into a real
Chroma server through the Syncer, searches with the query and checks the same order and scores.

The fixture is committed so the test needs no Python: run this only to regenerate it, with the
reference stack (torch + colpali-engine):

    /work/venvs/ref/bin/python scripts/check_search.py [OUT.json]

With `--chroma URL --collection NAME` it instead scores the records stored in a live collection
(their `full_embeddings` blobs) against the fixture's query and prints the order, to compare by
hand with `docusearch-agent search --json` on the same data.
"""
import base64
import gzip
import json
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch
from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

DIM = 128
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/search-reference/colpali_scores.json"


def unit_rows(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def encode_f32_gzip_b64(mv):
    return base64.b64encode(gzip.compress(mv.astype("<f4").tobytes(), mtime=0)).decode()


def decode(meta):
    rows, dim = (int(x) for x in meta["embedding_shape"].strip("()[] ").split(","))
    raw = base64.b64decode(meta["full_embeddings"])
    if meta.get("multivector_encoding", "f32-gzip-b64") == "f16-b64":
        return np.frombuffer(raw, "<f2").astype(np.float32).reshape(rows, dim)
    return np.frombuffer(gzip.decompress(raw), "<f4").reshape(rows, dim)


def colpali_scores(query, pages):
    s = BaseVisualRetrieverProcessor.score_multi_vector(
        [torch.from_numpy(query)], [torch.from_numpy(p) for p in pages], device="cpu"
    )
    return s[0].tolist()


def make_fixture(out):
    rng = np.random.default_rng(20261127)
    query = unit_rows(rng.standard_normal((20, DIM)))
    pages = []
    for i in range(12):
        rows = int(rng.integers(8, 21))
        page = rng.standard_normal((rows, DIM))
        # Some query tokens planted in some pages, with varying strength, so scores spread out.
        hits = rng.choice(20, size=int(rng.integers(0, 10)), replace=False)
        for h in hits:
            page[rng.integers(rows)] += (0.5 + 3 * rng.random()) * query[h] * np.sqrt(DIM)
        pages.append(unit_rows(page))
    # Padding: colpali-engine pads pages with zero rows, which only agrees with MaxSim when each
    # query token's best dot product is positive. Check it rather than assume it.
    for p in pages:
        assert (query @ p.T).max(axis=1).min() > 0, "a page whose best match is negative"
    scores = colpali_scores(query, pages)
    order = sorted(range(len(pages)), key=lambda i: -scores[i])
    gaps = [scores[order[k]] - scores[order[k + 1]] for k in range(len(order) - 1)]
    assert min(gaps) > 1e-3, f"near-tie in the reference order ({min(gaps)}): pick another seed"
    doc = {
        "generator": "scripts/check_search.py (numpy seed 20261127), scored by colpali-engine "
        "BaseVisualRetrieverProcessor.score_multi_vector on CPU",
        "dim": DIM,
        "query": {
            "embedding_shape": f"({query.shape[0]}, {DIM})",
            "full_embeddings": encode_f32_gzip_b64(query),
            "multivector_encoding": "f32-gzip-b64",
        },
        "pages": [
            {
                "embedding_shape": f"({p.shape[0]}, {DIM})",
                "full_embeddings": encode_f32_gzip_b64(p),
                "multivector_encoding": "f32-gzip-b64",
            }
            for p in pages
        ],
        "colpali_scores": scores,
        "colpali_order": order,
    }
    # The blobs must decode to exactly what was scored.
    for p, meta in zip(pages, doc["pages"]):
        assert np.array_equal(decode(meta), p)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}: order {order}")


def score_live(url, collection, fixture):
    ref = json.loads(Path(fixture).read_text())
    query = decode(ref["query"])
    base = f"{url.rstrip('/')}/api/v2/tenants/default_tenant/databases/default_database/collections"

    def call(method, path, body=None):
        req = urllib.request.Request(f"{base}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return json.load(r)

    cid = call("GET", f"/{collection}")["id"]
    got = call("POST", f"/{cid}/get", {"include": ["metadatas"]})
    pages = [decode(m) for m in got["metadatas"]]
    scores = colpali_scores(query, pages)
    for rank, i in enumerate(sorted(range(len(pages)), key=lambda i: -scores[i]), 1):
        print(f"{rank:>3}. {scores[i]:>10.4f}  {got['ids'][i]}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--chroma" in args:
        score_live(args[args.index("--chroma") + 1], args[args.index("--collection") + 1],
                   args[args.index("--fixture") + 1] if "--fixture" in args else DEFAULT_OUT)
    else:
        make_fixture(Path(args[0]) if args else DEFAULT_OUT)
