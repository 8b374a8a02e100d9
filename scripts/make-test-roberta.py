#!/usr/bin/env python3
"""Makes tests/data/tiny-roberta/: a tiny random RoBERTa (transformers' RobertaModel, seed 0) and
its last hidden states for fixed token ids, so tests/golden_bert.rs checks kdmcse's RoBERTa
forward (positions offset past the padding index, one token type) against the Hugging Face
implementation. Run once; the outputs are committed.

    python3 scripts/make-test-roberta.py [OUT_DIR]
"""
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/tiny-roberta")
torch.manual_seed(0)
config = transformers.RobertaConfig(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
model = transformers.RobertaModel(config, add_pooling_layer=False).eval()
# transformers initialises biases to 0 and LayerNorms to 1: perturb everything so they count.
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
model.save_pretrained(out, safe_serialization=True)
# Right-padded rows of different lengths (1 = <pad>). Padding positions differ between the two
# implementations (transformers numbers them pad_token_id, kdmcse continues counting) and are
# masked as keys, so only real tokens' states are compared.
ids = torch.tensor([[0, 17, 42, 8, 63, 2], [0, 66, 12, 2, 1, 1], [0, 90, 2, 1, 1, 1]])
mask = (ids != 1).long()
with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
save_file({"input_ids": ids.int(), "attention_mask": mask.int(), "last_hidden_state": hidden.contiguous()},
          str(out / "expected.safetensors"))
print(f"wrote {out}: transformers {transformers.__version__}, torch {torch.__version__}")
