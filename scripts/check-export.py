#!/usr/bin/env python3
"""Checks a `kdmcse export` folder in Python: Hugging Face AutoModel and sentence-transformers load
it, sentence-transformers' embeddings equal `kdmcse encode`'s to 1e-4, and the Hub's model-card
parser reads its README.md (front matter for sentence-transformers; the pooling, the config and,
when the export was evaluated, the results in the text).

    python3 scripts/check-export.py EXPORT_DIR [KDMCSE_BIN]

Needs torch, transformers and sentence-transformers (not installed by the test scripts: the
PyPI torch wheels with their CUDA dependencies are several GB).
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

SENTENCES = [
    "A man is playing a guitar on the street.",
    "Two dogs run through a field of tall grass.",
    "Café naïve façade — 東京",
    "hello",
]


def main() -> None:
    export = Path(sys.argv[1])
    kdmcse = sys.argv[2] if len(sys.argv) > 2 else "target/release/kdmcse"
    AutoModel.from_pretrained(export)
    model = SentenceTransformer(str(export), device="cpu")
    theirs = model.encode(SENTENCES, convert_to_numpy=True)
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.txt", Path(tmp) / "out.safetensors"
        inp.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
        subprocess.run([kdmcse, "encode", "--model", str(export), "--input", str(inp), "--output", str(out)], check=True)
        ours = load_file(str(out))["embeddings"]
    import json, sentence_transformers, torch, transformers
    stated = json.loads((export / "config_sentence_transformers.json").read_text())["__version__"]
    installed = {"sentence_transformers": sentence_transformers.__version__,
                 "transformers": transformers.__version__, "pytorch": torch.__version__.split("+")[0]}
    if stated != installed:
        print(f"note: the export states {stated}, this check ran with {installed}: "
              "update CHECKED_WITH in src/export.rs when it passes")
    diff = float(np.abs(ours - theirs).max())
    print(f"max |kdmcse - sentence-transformers| = {diff:.2e}")
    if diff > 1e-4:
        sys.exit(f"embeddings differ by {diff}")
    from huggingface_hub import ModelCard
    card = ModelCard.load(export / "README.md")
    pooling = model[1].pooling_mode  # "cls" or "mean", as sentence-transformers read 1_Pooling/
    problems = [what for what, ok in [
        ("library_name: sentence-transformers", card.data.library_name == "sentence-transformers"),
        ("pipeline_tag: sentence-similarity", card.data.pipeline_tag == "sentence-similarity"),
        (f"the pooling ({pooling})", f"{'avg' if pooling == 'mean' else pooling} pooling" in card.text),
        ("the run's config", "[train]" in card.text and "[model]" in card.text),
    ] if not ok]
    if problems:
        sys.exit(f"the model card lacks {problems}")
    results = "## Evaluation" in card.text
    print(f"model card: front matter and text read by huggingface_hub; results stated: {results}")


if __name__ == "__main__":
    main()
