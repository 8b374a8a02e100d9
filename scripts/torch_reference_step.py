#!/usr/bin/env python3
"""The PyTorch side of scripts/device-check.sh: kdmcse's SimCSE training step, timed on the same
machine, model and sentences.

The step mirrors `kdmcse train` with `loss.objective = "simcse"`: the batch's B sentences are
tokenised (max_len, padding to the longest), both dropout views run as one forward of 2B rows,
CLS -> MLP (dense + tanh) -> cosine similarity / temperature -> cross-entropy against the
diagonal, backward, global grad-norm clip 1.0, AdamW. Precision: "fp32" (TF32 off), "tf32"
(TF32 matmuls), "bf16" (torch.autocast, fp32 master weights), like kdmcse's train.precision and
train.tf32. Eager mode with transformers' default attention (SDPA), as users of the reference
code run it.

Prints one JSON object: median/mean step seconds after warm-up, sentences/s, peak memory.
"""

import argparse
import json
import statistics
import time

import torch
import transformers


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face BERT/RoBERTa folder")
    p.add_argument("--text", required=True, help="one sentence a line")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timings")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--temp", type=float, default=0.05)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    torch.manual_seed(1234)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModel.from_pretrained(args.model, add_pooling_layer=False).to(device).train()
    hidden = model.config.hidden_size
    mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh()).to(device)
    params = list(model.parameters()) + list(mlp.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.0)
    with open(args.text, encoding="utf-8") as f:
        sentences = [line.strip() for line in f if line.strip()]
    b = args.batch_size
    labels = torch.arange(b, device=device)

    def step(i):
        start = (i * b) % (len(sentences) - b)
        enc = tokenizer(sentences[start : start + b], max_length=args.max_len, truncation=True,
                        padding=True, return_tensors="pt")
        enc = {k: torch.cat([v, v]).to(device, non_blocking=True) for k, v in enc.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            cls = model(**enc).last_hidden_state[:, 0]
            z = mlp(cls)
        z = z.float()
        sim = torch.nn.functional.cosine_similarity(z[:b].unsqueeze(1), z[b:].unsqueeze(0), dim=-1)
        loss = torch.nn.functional.cross_entropy(sim / args.temp, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss, enc["input_ids"].shape[1], enc["attention_mask"].sum().item() / (2 * b)

    times, lengths, real_lengths = [], [], []
    for i in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, length, real_length = step(i)
        loss = loss.item()  # synchronises, as kdmcse's step does when it reads its loss
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            lengths.append(length)
            real_lengths.append(real_length)
    median = statistics.median(times)
    out = {
        "framework": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "attention": getattr(model.config, "_attn_implementation", "unknown"),
        "precision": args.precision,
        "batch_size": b,
        "max_len": args.max_len,
        "mean_padded_len": statistics.mean(lengths),
        "mean_real_len": statistics.mean(real_lengths),
        "timed_steps": len(times),
        "median_step_s": median,
        "mean_step_s": statistics.mean(times),
        "sentences_per_s": b / median,
        "last_loss": loss,
    }
    if device.type == "cuda":
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        out["device"] = torch.cuda.get_device_name()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
