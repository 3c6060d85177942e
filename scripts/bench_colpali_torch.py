#!/usr/bin/env python3
"""The PyTorch side of `cargo bench --bench embed`: a mid-size random ColPali through
colpali-engine (CPU torch), timed the same way as the Rust side.

  make DIR          writes the random checkpoint (merged layout, tiny tokenizer) into DIR
  serve DIR P Q     loads the model, then per input line `pages` or `queries` runs one batch of
                    P pages or Q queries and prints its wall time in seconds (the Rust side
                    interleaves these with its own runs, so both see the same machine load)

MID: vision 384 wide × 6 layers, text 512 × 6, 448-pixel pages (1,024 image tokens).
"""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import PaliGemmaConfig

from colpali_engine.models import ColPali

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_colpali as tiny  # noqa: E402

IMAGE_SIZE = 448
QUERY = "How do I read a CSV file into a data frame?"


def mid_config(vocab_size: int) -> PaliGemmaConfig:
    return PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=384, intermediate_size=1536,
            num_hidden_layers=6, num_attention_heads=6, image_size=IMAGE_SIZE, patch_size=14,
            hidden_act="gelu_pytorch_tanh", vision_use_head=False, num_image_tokens=1024,
        ),
        text_config=dict(
            model_type="gemma", vocab_size=vocab_size, hidden_size=512, intermediate_size=2048,
            num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=1, head_dim=64,
            hidden_act="gelu_pytorch_tanh", hidden_activation=None, max_position_embeddings=2048,
            rope_theta=10000.0, pad_token_id=0, bos_token_id=2, eos_token_id=1, num_image_tokens=1024,
        ),
        image_token_index=tiny.IMAGE_TOKEN_ID, projection_dim=512, hidden_size=512,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


def make(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok_src = tiny.MODEL_DIR / "tokenizer.json"
    shutil.copy(tok_src, out / "tokenizer.json")
    vocab = json.loads(tok_src.read_text())
    n_vocab = len(vocab["model"]["vocab"])
    config = mid_config(n_vocab)
    torch.manual_seed(0)
    model = ColPali(config).eval()
    tiny.randomize(model)
    save_file(tiny.merged_layout(model.state_dict()), str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)


def serve(out: Path, pages: int, queries: int) -> None:
    model = ColPali.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    rng = np.random.default_rng(0)
    # Inputs as the processor makes them; preprocessing is not what is timed on either side.
    pixel_values = torch.from_numpy(rng.uniform(-1, 1, (pages, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32))
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    prompt = [2] + tok.encode("Describe the image.\n", add_special_tokens=False).ids
    doc_ids = torch.tensor([[tiny.IMAGE_TOKEN_ID] * 1024 + prompt] * pages)
    q = [2] + tok.encode("Question: " + QUERY + tiny.QUERY_SUFFIX, add_special_tokens=False).ids
    q_ids = torch.tensor([q] * queries)
    runs = {
        "pages": lambda: model(input_ids=doc_ids, attention_mask=torch.ones_like(doc_ids),
                               pixel_values=pixel_values, token_type_ids=torch.zeros_like(doc_ids)),
        "queries": lambda: model(input_ids=q_ids, attention_mask=torch.ones_like(q_ids),
                                 token_type_ids=torch.zeros_like(q_ids)),
    }
    print(json.dumps({"threads": torch.get_num_threads(), "query_tokens": len(q)}), flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            fn = runs[line.strip()]
            t0 = time.perf_counter()
            fn()
            print(time.perf_counter() - t0, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(__doc__)
