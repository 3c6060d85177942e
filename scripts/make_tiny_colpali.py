#!/usr/bin/env python3
"""Builds the tiny random ColPali checkpoint and the reference outputs the Rust tests compare with.

Run with the reference stack (CPU torch, transformers, colpali-engine):

    /work/venvs/ref/bin/python scripts/make_tiny_colpali.py

Writes
  tests/fixtures/tiny-colpali/       the checkpoint, in the layout of vidore/colpali-v1.2-merged
                                     (config.json, model.safetensors, tokenizer.json, ...)
  tests/fixtures/colpali-reference/  reference.json (token ids, shapes, scores) and
                                     reference.safetensors (pixel values, embeddings)

The reference is colpali-engine's ColPali forward with the prompts of DESIGN.md set explicitly,
the image processor that resizes with PIL (bicubic), and attention made bidirectional with the
padding masked (what transformers 4.x did for PaliGemma at inference; 5.x would give a query
batch a causal mask).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers, decoders
from transformers import PaliGemmaConfig, PreTrainedTokenizerFast
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from colpali_engine.models import ColPali, ColPaliProcessor

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "tests/fixtures/tiny-colpali"
REF_DIR = ROOT / "tests/fixtures/colpali-reference"
CORPUS = ROOT / "tests/fixtures/corpus"

SEED = 1234
IMAGE_SIZE = 56
PATCH = 14
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
IMAGE_TOKEN_ID = SPECIALS.index("<image>")
POS_EMB = "model.model.vision_tower.embeddings.position_embedding.weight"

DOC_PROMPT = "Describe the image."
QUERY_PREFIX = "Question: "
QUERY_SUFFIX = "<pad>" * 10 + "\n"

QUERIES = [
    "What is R?",
    "How do I read a CSV file into a data frame?",
    "Which settings change the grid of the scatter plot, and where is the export dialog?",
]

TRAINING_TEXT = [
    "Describe the image.\n",
    "Question: a question, then ten pads and a new line\n",
    "Question: What is R? How do I read a CSV file into a data frame?",
    "Which settings change the grid of the scatter plot, and where is the export dialog?",
    "An Introduction to R: notes on R, a programming environment for data analysis and graphics.",
    "R Data Import/Export: reading spreadsheets, databases, binary files and network connections.",
    "The xfig global settings window: grid mode, units, paper size, export and print options.",
]


def build_tokenizer() -> Tokenizer:
    """A small BPE with Gemma's special tokens and its space handling (spaces become ▁)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Replace("\u2581", " ")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, f"{s} must have id {i}"
    return tok


def build_config(vocab_size: int) -> PaliGemmaConfig:
    return PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_channels=3,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            layer_norm_eps=1e-6,
            hidden_act="gelu_pytorch_tanh",
            vision_use_head=False,
            num_image_tokens=N_IMAGE_TOKENS,
        ),
        text_config=dict(
            model_type="gemma",
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            hidden_act="gelu_pytorch_tanh",
            hidden_activation=None,
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
            rope_theta=10000.0,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
            num_image_tokens=N_IMAGE_TOKENS,
        ),
        image_token_index=IMAGE_TOKEN_ID,
        projection_dim=64,
        hidden_size=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )


def randomize(model: torch.nn.Module) -> None:
    """Every parameter random, norms and biases included, so a wrong `1 +` or a dropped bias shows."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif "layer_norm" in name or "layernorm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                # Gemma RMSNorm weights (used as 1 + w) and linear biases.
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        emb = dict(model.named_parameters())[POS_EMB]
        emb.copy_(0.5 * torch.randn(emb.shape, generator=g))


def merged_layout(state: dict) -> dict:
    """transformers 5.x names → the names in vidore/colpali-v1.2-merged's safetensors."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.lm_head."):
            continue  # tied to the token embeddings, not stored
        for new, old in [
            ("model.model.language_model.", "model.language_model.model."),
            ("model.model.vision_tower.", "model.vision_tower.vision_model."),
            ("model.model.multi_modal_projector.", "model.multi_modal_projector."),
        ]:
            if k.startswith(new):
                k = old + k[len(new):]
        out[k] = v if v.is_meta else v.detach().contiguous().clone()
    return out


def synthetic_image() -> Image.Image:
    """A small odd-sized image with edges and gradients, so the resize is exercised both ways."""
    h, w = 41, 73
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // (w - 1)).astype(np.uint8)
    gch = (y * 255 // (h - 1)).astype(np.uint8)
    b = (((x // 6 + y // 6) % 2) * 200 + 30).astype(np.uint8)
    return Image.fromarray(np.stack([r, gch, b], axis=-1), mode="RGB")


def real_layout() -> None:
    """Names and shapes of every tensor in vidore/colpali-v1.2-merged's safetensors, from
    transformers' own model definition at the real config (on the meta device: no memory)."""
    real = ROOT / "tests/fixtures/colpali-v1.2-merged/config.json"
    config = PaliGemmaConfig.from_pretrained(real.parent)
    with torch.device("meta"):
        model = ColPali(config)
    layout = {k: list(v.shape) for k, v in merged_layout(model.state_dict()).items()}
    lines = [f"  {json.dumps(k)}: {json.dumps(layout[k])}" for k in sorted(layout)]
    (REF_DIR / "real_layout.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")


def main() -> int:
    torch.manual_seed(SEED)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    REF_DIR.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    tok.save(str(MODEL_DIR / "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(MODEL_DIR / "tokenizer.json"),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
    )
    hf_tok.image_token = "<image>"
    hf_tok.image_token_id = IMAGE_TOKEN_ID
    hf_tok.add_bos_token = False
    hf_tok.add_eos_token = False

    # Saved before the processor adds PaliGemma's 1,152 <locNNNN>/<segNNN> tokens to it.
    hf_tok.save_pretrained(MODEL_DIR)
    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        rescale_factor=1 / 255,
    )
    image_processor.image_seq_length = N_IMAGE_TOKENS
    processor = ColPaliProcessor(image_processor=image_processor, tokenizer=hf_tok)
    # The prompts of DESIGN.md, set explicitly: the processor inserts <bos> after the image
    # tokens and appends "\n"; the defaults of some colpali-engine versions add a second <bos>.
    processor.visual_prompt_prefix = "<image>" + DOC_PROMPT
    processor.query_prefix = QUERY_PREFIX

    config = build_config(vocab_size=tok.get_vocab_size())
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    config._attn_implementation = "eager"
    model = ColPali(config).eval()
    randomize(model)

    # Save in the merged layout, then load it back through colpali-engine's own key mapping:
    # the reference below runs on exactly the tensors the Rust side reads.
    save_file(merged_layout(model.state_dict()), str(MODEL_DIR / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(MODEL_DIR)
    image_processor.save_pretrained(MODEL_DIR)
    reloaded = ColPali.from_pretrained(MODEL_DIR, torch_dtype=torch.float32,
                                       attn_implementation="eager").eval()
    for k, v in model.state_dict().items():
        if k == "model.lm_head.weight":
            continue
        assert torch.equal(v, reloaded.state_dict()[k]), f"{k} did not round-trip"
    model = reloaded

    # Inputs: two real PNGs from the corpus and one synthetic image (committed as a file).
    synth_path = REF_DIR / "synthetic.png"
    synthetic_image().save(synth_path)
    image_files = [
        ("corpus", "global-settings.png"),
        ("corpus", "scatter-plot.png"),
        ("fixture", "colpali-reference/synthetic.png"),
    ]
    images = []
    for where, rel in image_files:
        p = (CORPUS / rel) if where == "corpus" else (ROOT / "tests/fixtures" / rel)
        images.append(Image.open(p).convert("RGB"))

    with torch.no_grad():
        batch_doc = processor.process_images(images)
        batch_q = processor.process_queries(QUERIES, suffix=QUERY_SUFFIX)

        doc_ids = batch_doc["input_ids"]
        expected_doc = [IMAGE_TOKEN_ID] * N_IMAGE_TOKENS + [2] + tok.encode(
            DOC_PROMPT + "\n", add_special_tokens=False).ids
        for row in doc_ids.tolist():
            assert row == expected_doc, f"document ids {row} != {expected_doc}"
        q_ids = []
        for i, q in enumerate(QUERIES):
            expected = [2] + tok.encode(QUERY_PREFIX + q + QUERY_SUFFIX, add_special_tokens=False).ids
            n = int(batch_q["attention_mask"][i].sum())
            got = batch_q["input_ids"][i, :n].tolist()
            assert got == expected, f"query ids {got} != {expected}"
            assert expected.count(0) == 10, "the 10 <pad> tokens of the query prompt are kept"
            q_ids.append(expected)

        def run(batch):
            kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
            # All-zero token_type_ids: the whole sequence is "prefix", i.e. bidirectional.
            kw["token_type_ids"] = torch.zeros_like(batch["input_ids"])
            return model(**kw)

        # ColPali projects hidden_states[-1]: it must be the final-normed state (4.x semantics).
        base = model.model.model(input_ids=batch_q["input_ids"], attention_mask=batch_q["attention_mask"],
                                 token_type_ids=torch.zeros_like(batch_q["input_ids"]),
                                 output_hidden_states=True)
        assert torch.equal(base.hidden_states[-1], base.last_hidden_state), "hidden_states[-1] is not normed"

        doc_emb = run(batch_doc)
        q_emb = run(batch_q)

        # Batch invariance of the reference itself: each query alone gives the same rows.
        for i, q in enumerate(QUERIES):
            single = run(processor.process_queries([q], suffix=QUERY_SUFFIX))[0]
            n = single.shape[0]
            assert torch.allclose(single, q_emb[i, :n], atol=1e-5), "padding leaks into a query"

        q_list = [q_emb[i, : len(q_ids[i])] for i in range(len(QUERIES))]
        d_list = [doc_emb[i] for i in range(len(images))]
        scores = processor.score_multi_vector(q_list, d_list)

    tensors = {"pixel_values": batch_doc["pixel_values"].float().contiguous()}
    for i, d in enumerate(d_list):
        tensors[f"image_{i}"] = d.float().contiguous()
    for i, q in enumerate(q_list):
        tensors[f"query_{i}"] = q.float().contiguous()
    save_file(tensors, str(REF_DIR / "reference.safetensors"))
    ref = {
        "generator": "scripts/make_tiny_colpali.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "colpali_engine": __import__("importlib.metadata").metadata.version("colpali-engine"),
        },
        "image_size": IMAGE_SIZE,
        "images": [{"where": w, "path": p} for w, p in image_files],
        "image_input_ids": expected_doc,
        "queries": QUERIES,
        "query_input_ids": q_ids,
        "scores": scores.tolist(),
    }
    (REF_DIR / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    real_layout()
    print("wrote", MODEL_DIR, REF_DIR)
    print("scores", scores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
