#!/usr/bin/env python3
"""Makes tests/data/tiny-clip/: a tiny random CLIP (transformers' CLIPModel, seed 0) with a
word-level tokenizer, and the Hugging Face implementation's outputs on it, so tests/precompute.rs
checks kdmcse's teacher (candle's CLIP, our tokenizer padding, our image preprocessing) against
transformers rather than against itself. Run once; the outputs are committed.

    python3 scripts/make-test-clip.py [OUT_DIR]

expected.safetensors holds, for three captions and two COCO sample images of ../shared/data:
the captions' token ids (one row each, unpadded: the lengths differ) and their projected
features; the images' pixel values from CLIPImageProcessor and their projected features.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "is", "are", "man", "woman", "people",
         "person", "dog", "cat", "table", "street", "room", "sitting", "standing", "white", "black",
         "red", "two", "large", "small", "next", "to", "at", ".", ","]
CAPTIONS = ["A man sitting at a table .", "two dogs on the street", "a small white cat ."]
IMAGES = ["000000000139.jpg", "000000000802.jpg"]

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/tiny-clip")
images = Path(__file__).resolve().parent.parent.parent / "shared/data/coco/images_val2017_sample"
out.mkdir(parents=True, exist_ok=True)

# Vocabulary: [UNK], the words, <|startoftext|>, <|endoftext|> (the largest id: CLIP pools the
# text at the end token, found by argmax over ids in transformers' legacy rule).
vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
bos, eos = len(vocab), len(vocab) + 1
vocab["<|startoftext|>"], vocab["<|endoftext|>"] = bos, eos

def special(name, i):
    return {"id": name, "ids": [i], "tokens": [name]}

tokenizer = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
    "normalizer": {"type": "Lowercase"},
    "pre_tokenizer": {"type": "Whitespace"},
    "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|startoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|startoftext|>": special("<|startoftext|>", bos),
                           "<|endoftext|>": special("<|endoftext|>", eos)}},
    "decoder": None,
    "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
}
(out / "tokenizer.json").write_text(json.dumps(tokenizer))

torch.manual_seed(0)
config = transformers.CLIPConfig(
    projection_dim=16,
    text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, max_position_embeddings=77,
                     num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu",
                     bos_token_id=bos, eos_token_id=2),  # eos 2: transformers' argmax pooling
    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, hidden_act="quick_gelu"),
)
model = transformers.CLIPModel(config).eval()
# transformers initialises biases to 0 and LayerNorms to 1: perturb everything so they count.
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
model.save_pretrained(out, safe_serialization=True)
processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
processor.save_pretrained(out)

def ids_of(caption):
    words = caption.lower().replace(".", " . ").replace(",", " , ").split()
    return [bos] + [vocab.get(w, 0) for w in words] + [eos]

def projected(output):
    """get_*_features return the projected tensor (transformers 4) or an output holding it (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output

expected = {}
with torch.no_grad():
    for i, caption in enumerate(CAPTIONS):
        ids = torch.tensor([ids_of(caption)])
        expected[f"caption_{i}.input_ids"] = ids.int()
        expected[f"caption_{i}.features"] = projected(model.get_text_features(input_ids=ids))
    for i, name in enumerate(IMAGES):
        pixels = processor(images=Image.open(images / name).convert("RGB"), return_tensors="pt")["pixel_values"]
        expected[f"image_{i}.pixel_values"] = pixels.contiguous()
        expected[f"image_{i}.features"] = projected(model.get_image_features(pixel_values=pixels))
save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))
(out / "expected.json").write_text(json.dumps({"captions": CAPTIONS, "images": IMAGES}, indent=1) + "\n")
print(f"wrote {out}: transformers {transformers.__version__}, torch {torch.__version__}")
