#!/usr/bin/env python3
"""The PyTorch side of scripts/bench_fullsize (reference stack: CPU torch, colpali-engine).

  page OUT.png                 writes the benchmark's page: 448x448 RGB noise, seed 0
  run DIR PAGE PAGES QUERIES THREADS QUERY OUT.npz
                               loads DIR with colpali-engine's ColPali in f32, embeds PAGE
                               PAGES times and QUERY QUERIES times, one forward each; prints
                               `bench: ready`, then `bench: page N SECS` / `... query N SECS` on stderr as each
                               ends (the driver timestamps them), one JSON line on stdout, and
                               the first page's and query's vectors into OUT.npz

Inputs are what the agent feeds its own forward: the page's pixels as SigLIP's processor makes
them (exact size, x/255, mean = std = 0.5) and the agent's token ids (same prompts, the
checkpoint's tokenizer), so both sides run the same computation.
"""

import json
import sys
import time
from pathlib import Path

IMAGE_SIZE = 448
DOCUMENT_PROMPT = "Describe the image.\n"  # src/embed/prompt.rs
QUERY_PREFIX = "Question: "
QUERY_SUFFIX = "<pad>" * 10 + "\n"


def page(out: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(out)


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def run(model_dir: Path, page_png: Path, pages: int, queries: int, threads: int, query: str, out: Path) -> None:
    started = time.perf_counter()
    import numpy as np
    import torch
    from PIL import Image
    from tokenizers import Tokenizer

    from colpali_engine.models import ColPali

    torch.set_num_threads(threads)
    imported = time.perf_counter()
    model = ColPali.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    loaded = time.perf_counter()
    log("bench: ready")

    cfg = json.loads((model_dir / "config.json").read_text())
    pre_path = model_dir / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.exists() else {}
    mean = np.array(pre.get("image_mean", [0.5] * 3), dtype=np.float32)[:, None, None]
    std = np.array(pre.get("image_std", [0.5] * 3), dtype=np.float32)[:, None, None]
    img = np.asarray(Image.open(page_png).convert("RGB"), dtype=np.float32)
    size = cfg["vision_config"]["image_size"]
    assert img.shape == (size, size, 3), f"the page must already be {size}x{size}: no resize on either side"
    pixels = torch.from_numpy((img.transpose(2, 0, 1) / 255.0 - mean) / std).unsqueeze(0).float()

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    n_image = cfg["vision_config"].get("num_image_tokens") or (IMAGE_SIZE // 14) ** 2
    doc_ids = torch.tensor([[cfg["image_token_index"]] * n_image + [2] + tok.encode(DOCUMENT_PROMPT, add_special_tokens=False).ids])
    q_ids = torch.tensor([[2] + tok.encode(QUERY_PREFIX + query + QUERY_SUFFIX, add_special_tokens=False).ids])

    # CPU seconds beside wall seconds: on a shared box they show the work apart from the share of
    # the cores the process got (OpenMP's spin-waiting counts as CPU time too).
    page_secs, query_secs, page_cpu, query_cpu, first = [], [], [], [], {}
    with torch.inference_mode():
        for n in range(1, pages + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            v = model(input_ids=doc_ids, attention_mask=torch.ones_like(doc_ids), pixel_values=pixels,
                      token_type_ids=torch.zeros_like(doc_ids))
            page_secs.append(time.perf_counter() - t0)
            page_cpu.append(time.process_time() - c0)
            log("bench: page", n, f"{page_secs[-1]:.3f}")
            first.setdefault("page", v[0].float().numpy())
        for n in range(1, queries + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            v = model(input_ids=q_ids, attention_mask=torch.ones_like(q_ids), token_type_ids=torch.zeros_like(q_ids))
            query_secs.append(time.perf_counter() - t0)
            query_cpu.append(time.process_time() - c0)
            log("bench: query", n, f"{query_secs[-1]:.3f}")
            first.setdefault("query", v[0].float().numpy())
    np.savez(out, **first)
    print(json.dumps({
        "import_secs": imported - started, "load_secs": loaded - imported,
        "images_secs": page_secs, "queries_secs": query_secs,
        "images_cpu_secs": page_cpu, "queries_cpu_secs": query_cpu,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "query_tokens": int(q_ids.shape[1]),
    }), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "page":
        page(Path(sys.argv[2]))
    elif len(sys.argv) == 9 and sys.argv[1] == "run":
        a = sys.argv[2:]
        run(Path(a[0]), Path(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5], Path(a[6]))
    else:
        sys.exit(__doc__)
