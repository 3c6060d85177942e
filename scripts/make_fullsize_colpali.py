#!/usr/bin/env python3
"""Writes a full-size random ColPali checkpoint in the published form of vidore/colpali-v1.2-merged,
for load and speed measurements where the real weights cannot be downloaded.

    python3 scripts/make_fullsize_colpali.py OUT_DIR [--seed N]    (needs numpy; ~5.9 GB written)

What it writes, and why each part looks as it does:
  config.json                       the real one (tests/fixtures/colpali-v1.2-merged), quirks kept:
                                    `hidden_activation: null`, `_vocab_size` != text vocab_size
  model-0000{1,2}-of-00002.safetensors
                                    bf16, every tensor of tests/fixtures/colpali-reference/
                                    real_layout.json (the merged key layout) with its real shape,
                                    split greedily at 5 GB the way `save_pretrained` shards: ~4.99
                                    GB and ~0.86 GB, as published
  model.safetensors.index.json      `metadata.total_size` and `weight_map`, as published
  tokenizer.json, tokenizer_config.json
                                    the tiny fixture's tokenizer: its ids (< 300) are valid rows of
                                    the real 257,216-row embedding table
  preprocessor_config.json          SigLIP's at 448 px, as published

The values are random (uniform, scaled by 1/sqrt(fan_in); norm weights near their neutral value),
so outputs mean nothing; shapes, dtypes, file layout and sizes are the real ones. The safetensors
files are written directly (an 8-byte header length, a JSON header, then the raw little-endian
bytes): numpy has no bfloat16, and this keeps the script free of torch.
"""

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REAL_CONFIG = ROOT / "tests/fixtures/colpali-v1.2-merged/config.json"
REAL_LAYOUT = ROOT / "tests/fixtures/colpali-reference/real_layout.json"
TINY = ROOT / "tests/fixtures/tiny-colpali"

# `save_pretrained`'s default max_shard_size ("5GB", decimal).
MAX_SHARD_BYTES = 5_000_000_000
# Elements generated at a time: bounds the script's memory (~200 MB of float32 at once).
CHUNK = 1 << 24


def shards(layout: dict) -> list:
    """Greedy split in name order: a tensor that would push a shard past the limit starts the next."""
    out, cur, size = [], [], 0
    for name in sorted(layout):
        nbytes = 2 * int(np.prod(layout[name]))
        if cur and size + nbytes > MAX_SHARD_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    out.append(cur)
    return out


def scale_of(name: str, shape: list) -> tuple:
    """(centre, half-width) of the uniform distribution for one tensor."""
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        # Uniform(-a, a) has variance a²/3: a = sqrt(3 / fan_in) gives variance 1/fan_in.
        return 0.0, (3.0 / fan_in) ** 0.5
    if "vision_tower" in name and "norm" in name and name.endswith("weight"):
        return 1.0, 0.1  # SigLIP LayerNorm scales
    # Gemma RMSNorm weights (used as 1 + w), LayerNorm shifts and biases.
    return 0.0, 0.1


def write_bf16(f, rng, n: int, centre: float, half: float) -> None:
    done = 0
    while done < n:
        m = min(CHUNK, n - done)
        x = rng.random(m, dtype=np.float32)
        x *= 2.0 * half
        x += centre - half
        # bf16 = the top 16 bits of the f32 (truncation: fine for random values).
        f.write((x.view(np.uint32) >> 16).astype("<u2").tobytes())
        done += m


def write_shard(path: Path, names: list, layout: dict, rng) -> int:
    header, offset = {}, 0
    for name in names:
        nbytes = 2 * int(np.prod(layout[name]))
        header[name] = {"dtype": "BF16", "shape": layout[name], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            centre, half = scale_of(name, layout[name])
            write_bf16(f, rng, int(np.prod(layout[name])), centre, half)
    return offset


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    config = json.loads(REAL_CONFIG.read_text())
    layout = json.loads(REAL_LAYOUT.read_text())
    vocab = config["text_config"]["vocab_size"]
    emb = layout["model.language_model.model.embed_tokens.weight"]
    assert emb[0] == vocab, f"the layout's embedding has {emb[0]} rows, the config says {vocab}"

    rng = np.random.default_rng(args.seed)
    parts = shards(layout)
    weight_map, total = {}, 0
    for i, names in enumerate(parts, 1):
        fname = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        total += write_shard(out / fname, names, layout, rng)
        weight_map.update({n: fname for n in names})
        print(f"wrote {out / fname} ({(out / fname).stat().st_size / 1e9:.2f} GB)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    shutil.copy(REAL_CONFIG, out / "config.json")
    shutil.copy(TINY / "tokenizer.json", out / "tokenizer.json")
    shutil.copy(TINY / "tokenizer_config.json", out / "tokenizer_config.json")
    pre = json.loads((TINY / "preprocessor_config.json").read_text())
    size = config["vision_config"]["image_size"]
    pre["size"] = {"height": size, "width": size}
    pre["image_seq_length"] = config["vision_config"]["num_image_tokens"]
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    print(f"done: {out} ({total / 1e9:.2f} GB of bf16 weights in {len(parts)} shards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
