"""The Python side of `cargo run --release --example bench_e2e`: the old DocuSearch worker's
path with no model, on the same folder and the same Chroma server as the agent.

Per PDF: pypdfium2 render at DPI, PIL `convert("RGB")` and bicubic resize to the model's
square size, page text (`get_text_range`), 250/50-word chunks of the document's text; in place
of the model, a multi-vector of the given shape per page and per chunk (cheap, deterministic);
records with DocuSearch's metadata (`full_embeddings` as f32-gzip-b64, the mean as the
embedding) upserted with the `chromadb` client in batches of 100 into `{prefix}_visual` and
`{prefix}_text`. Prints one JSON object on stdout.

python e2e_python_baseline.py URL PREFIX DPI SIZE PAGE_TOKENS CHUNK_TOKENS DIM FOLDER
"""

import base64
import datetime
import gzip
import hashlib
import json
import os
import resource
import sys
import time
from urllib.parse import urlparse

try:
    import chromadb
    import numpy as np
    import pypdfium2 as pdfium
    from PIL import Image
except ImportError as e:  # say what to install instead of a traceback
    print(json.dumps({"error": f"{e}; this Python needs chromadb, numpy, pypdfium2 and Pillow"}))
    sys.exit(2)

BATCH = 100
CHUNK_WORDS, CHUNK_OVERLAP = 250, 50


def multivector(seed_bytes, tokens, dim):
    """What the model would return, without a model: unit rows derived from the input."""
    seed = int.from_bytes(hashlib.blake2b(seed_bytes, digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal((tokens, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def encode(v):
    mean = v.mean(axis=0)
    mean /= max(float(np.linalg.norm(mean)), 1e-12)
    blob = base64.b64encode(gzip.compress(v.astype("<f4").tobytes())).decode("ascii")
    return mean.tolist(), blob


def chunks(text):
    words = text.split()
    step = CHUNK_WORDS - CHUNK_OVERLAP
    for start in range(0, max(len(words), 1), step):
        part = words[start : start + CHUNK_WORDS]
        if part:
            yield " ".join(part), len(part)
        if start + CHUNK_WORDS >= len(words):
            break


class Batches:
    def __init__(self, collection):
        self.c, self.ids, self.embs, self.docs, self.metas = collection, [], [], [], []
        self.first_flush = None

    def add(self, id_, emb, doc, meta):
        self.ids.append(id_)
        self.embs.append(emb)
        self.docs.append(doc)
        self.metas.append(meta)
        if len(self.ids) >= BATCH:
            self.flush()

    def flush(self):
        if not self.ids:
            return
        self.c.upsert(ids=self.ids, embeddings=self.embs, documents=self.docs, metadatas=self.metas)
        if self.first_flush is None:
            self.first_flush = time.perf_counter()
        self.ids, self.embs, self.docs, self.metas = [], [], [], []


def main():
    url, prefix, dpi, size, page_tokens, chunk_tokens, dim, folder = sys.argv[1:9]
    dpi, size, page_tokens, chunk_tokens, dim = map(int, (dpi, size, page_tokens, chunk_tokens, dim))
    u = urlparse(url)
    start = time.perf_counter()
    client = chromadb.HttpClient(host=u.hostname, port=u.port)
    space = {"hnsw:space": "cosine"}
    visual = Batches(client.get_or_create_collection(f"{prefix}_visual", metadata=space))
    text = Batches(client.get_or_create_collection(f"{prefix}_text", metadata=space))
    files = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(".pdf")
    )
    pages = n_chunks = 0
    for path in files:
        doc_id = hashlib.blake2b(path.encode(), digest_size=16).hexdigest()
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
        pdf = pdfium.PdfDocument(path)
        num_pages = len(pdf)
        full_text = []
        for i, page in enumerate(pdf):
            img = page.render(scale=dpi / 72).to_pil().convert("RGB")
            img = img.resize((size, size), Image.BICUBIC)
            textpage = page.get_textpage()
            page_text = textpage.get_text_range()
            textpage.close()
            page.close()
            full_text.append(page_text)
            v = multivector(img.tobytes()[:4096], page_tokens, dim)
            emb, blob = encode(v)
            meta = {
                "doc_id": doc_id, "type": "visual", "filename": os.path.basename(path),
                "source_path": path, "page": i + 1, "num_pages": num_pages, "format": "pdf",
                "timestamp": stamp, "full_embeddings": blob,
                "embedding_shape": f"({page_tokens}, {dim})", "seq_length": page_tokens,
            }
            visual.add(f"{doc_id}-page{i + 1:03d}", emb, page_text, meta)
            pages += 1
        pdf.close()
        for j, (chunk, words) in enumerate(chunks("\n".join(full_text))):
            v = multivector(chunk.encode(), chunk_tokens, dim)
            emb, blob = encode(v)
            meta = {
                "doc_id": doc_id, "type": "text", "filename": os.path.basename(path),
                "source_path": path, "num_pages": num_pages, "format": "pdf",
                "timestamp": stamp, "full_embeddings": blob,
                "embedding_shape": f"({chunk_tokens}, {dim})", "seq_length": chunk_tokens,
                "chunk_id": j, "full_text": chunk, "text_preview": chunk[:200], "word_count": words,
            }
            text.add(f"{doc_id}-chunk{j:04d}", emb, chunk, meta)
            n_chunks += 1
    visual.flush()
    text.flush()
    end = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    firsts = [t for t in (visual.first_flush, text.first_flush) if t is not None]
    print(json.dumps({
        "pages": pages, "chunks": n_chunks, "seconds": end - start,
        "first_upsert_s": (min(firsts) - start) if firsts else None,
        "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_kb": ru.ru_maxrss,
    }))


if __name__ == "__main__":
    main()
