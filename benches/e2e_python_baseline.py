"""The Python side of `cargo run --release --example bench_e2e`: the old DocuSearch worker's
path, on the same folder and the same Chroma server as the agent; with no model, or (`--model`)
with colpali-engine's ColPali on CPU torch.

Per PDF: pypdfium2 render at DPI, PIL `convert("RGB")` and bicubic resize to the model's
square size, page text (`get_text_range`), 250/50-word chunks of the document's text; in place
of the model, a multi-vector of the given shape per page and per chunk (cheap, deterministic);
records with DocuSearch's metadata (`full_embeddings` as f32-gzip-b64, the mean as the
embedding) upserted with the `chromadb` client in batches of 100 (fewer when 100 would pass
Chroma's 40 MiB request limit: mid-size page records are ~0.7 MB each) into `{prefix}_visual`
and `{prefix}_text`. Prints one JSON object on stdout.

With `--model DIR --threads N --batch-visual B --batch-text B` the multi-vectors come from
colpali-engine's `ColPali` on DIR (f32, CPU, `torch.set_num_threads(N)`): pages through a
`ColPaliProcessor` built as scripts/make_tiny_colpali.py builds it (bicubic resize to SIZE,
mean = std = 0.5; DESIGN.md's prompts), B pages per forward within a document; chunks through
`process_queries` (query prompt, ten `<pad>` and a new line), B per forward, padding rows
dropped, cut to the model's positions as the agent does. PAGE_TOKENS and CHUNK_TOKENS are
then unused.

python e2e_python_baseline.py URL PREFIX DPI SIZE PAGE_TOKENS CHUNK_TOKENS DIM FOLDER [--model DIR --threads N --batch-visual B --batch-text B]
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
# Chroma refuses request bodies over 40 MiB; blobs are most of a request.
BATCH_BLOB_BYTES = 36 << 20
CHUNK_WORDS, CHUNK_OVERLAP = 250, 50


def multivector(seed_bytes, tokens, dim):
    """What the model would return, without a model: unit rows derived from the input."""
    seed = int.from_bytes(hashlib.blake2b(seed_bytes, digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal((tokens, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


class Model:
    """colpali-engine's ColPali and a processor equivalent to ColPaliProcessor.from_pretrained
    on the checkpoint (which ships only tokenizer.json, so the processor is assembled here)."""

    def __init__(self, model_dir, size, threads, batch_visual, batch_text):
        import torch
        from colpali_engine.models import ColPali, ColPaliProcessor
        from transformers import PreTrainedTokenizerFast
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        torch.set_num_threads(threads)
        self.torch = torch
        self.batch_visual, self.batch_text = batch_visual, batch_text
        self.model = ColPali.from_pretrained(model_dir, torch_dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
        self.max_len = self.model.config.text_config.max_position_embeddings
        tok = PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(model_dir, "tokenizer.json"), bos_token="<bos>",
            eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", padding_side="right")
        tok.image_token = "<image>"
        tok.image_token_id = tok.convert_tokens_to_ids("<image>")
        tok.add_bos_token = False
        tok.add_eos_token = False
        patch = self.model.config.vision_config.patch_size
        images = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3, rescale_factor=1 / 255)
        images.image_seq_length = (size // patch) ** 2
        self.processor = ColPaliProcessor(image_processor=images, tokenizer=tok)
        # DESIGN.md's prompts: the processor puts <bos> after the image tokens and appends "\n".
        self.processor.visual_prompt_prefix = "<image>Describe the image."
        self.processor.query_prefix = "Question: "

    def _run(self, batch):
        kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        if kw["input_ids"].shape[1] > self.max_len:  # the agent cuts at the model's positions too
            kw["input_ids"] = kw["input_ids"][:, : self.max_len]
            kw["attention_mask"] = kw["attention_mask"][:, : self.max_len]
        # All-zero token_type_ids: bidirectional attention, as in the reference.
        kw["token_type_ids"] = self.torch.zeros_like(kw["input_ids"])
        with self.torch.inference_mode():
            out = self.model(**kw)
        lens = kw["attention_mask"].sum(dim=1).tolist()
        return [out[i, : int(n)].float().numpy() for i, n in enumerate(lens)]

    def pages(self, images):
        return self._run(self.processor.process_images(images))

    def chunks(self, texts):
        return self._run(self.processor.process_queries(texts, suffix="<pad>" * 10 + "\n"))


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
        self.bytes = 0
        self.first_flush = None

    def add(self, id_, emb, doc, meta):
        size = len(meta["full_embeddings"])
        if self.ids and self.bytes + size > BATCH_BLOB_BYTES:
            self.flush()
        self.bytes += size
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
        self.bytes = 0


def main():
    url, prefix, dpi, size, page_tokens, chunk_tokens, dim, folder = sys.argv[1:9]
    dpi, size, page_tokens, chunk_tokens, dim = map(int, (dpi, size, page_tokens, chunk_tokens, dim))
    opts = dict(zip(sys.argv[9::2], sys.argv[10::2]))
    u = urlparse(url)
    start = time.perf_counter()
    model = None
    if "--model" in opts:
        model = Model(opts["--model"], size, int(opts["--threads"]), int(opts["--batch-visual"]),
                      int(opts["--batch-text"]))
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
        pending = []  # (page number, image, text) waiting for a model batch

        def embed_pages():
            if model is not None:
                vs = model.pages([img for _, img, _ in pending])
            else:
                vs = [multivector(img.tobytes()[:4096], page_tokens, dim) for _, img, _ in pending]
            for (i, _, page_text), v in zip(pending, vs):
                emb, blob = encode(v)
                meta = {
                    "doc_id": doc_id, "type": "visual", "filename": os.path.basename(path),
                    "source_path": path, "page": i + 1, "num_pages": num_pages, "format": "pdf",
                    "timestamp": stamp, "full_embeddings": blob,
                    "embedding_shape": f"({v.shape[0]}, {v.shape[1]})", "seq_length": v.shape[0],
                }
                visual.add(f"{doc_id}-page{i + 1:03d}", emb, page_text, meta)
            pending.clear()

        for i, page in enumerate(pdf):
            img = page.render(scale=dpi / 72).to_pil().convert("RGB")
            if model is None:
                img = img.resize((size, size), Image.BICUBIC)  # with a model, its processor does
            textpage = page.get_textpage()
            page_text = textpage.get_text_range()
            textpage.close()
            page.close()
            full_text.append(page_text)
            pending.append((i, img, page_text))
            if model is None or len(pending) >= model.batch_visual:
                embed_pages()
            pages += 1
        if pending:
            embed_pages()
        pdf.close()
        doc_chunks = list(chunks("\n".join(full_text)))
        step = model.batch_text if model is not None else 1
        for b in range(0, len(doc_chunks), step):
            part = doc_chunks[b : b + step]
            if model is not None:
                vs = model.chunks([c for c, _ in part])
            else:
                vs = [multivector(c.encode(), chunk_tokens, dim) for c, _ in part]
            for j, ((chunk, words), v) in enumerate(zip(part, vs), start=b):
                emb, blob = encode(v)
                meta = {
                    "doc_id": doc_id, "type": "text", "filename": os.path.basename(path),
                    "source_path": path, "num_pages": num_pages, "format": "pdf",
                    "timestamp": stamp, "full_embeddings": blob,
                    "embedding_shape": f"({v.shape[0]}, {v.shape[1]})", "seq_length": v.shape[0],
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
