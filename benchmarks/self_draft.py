"""Should the device draft tokens from its own head and tail, skipping the body? Measure first.

For every split (K, M) the shallow model "embeddings + first K + last M layers + norm + LM head" (what
the device holds) predicts each next token of the full model's own greedy answers, teacher-forced.
Its hit rate is the acceptance rate self-drafting would get: `python3 -m benchmarks self-draft`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.common import environment, write
from lambdasplit.split.sources import resolve_source

PROMPTS = Path(__file__).parent / "prompts"
SPLITS = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]


def acceptance(new_tokens: int = 48, per_set: int = 6) -> Path:
    path = resolve_source(None).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = model.model.layers
    answers: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for name in ("reuse", "chat"):
            prompts = json.loads((PROMPTS / f"{name}.json").read_text())[:per_set]
            answers[name] = []
            for text in tqdm(prompts, desc=f"full-model answers ({name})"):
                ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)["input_ids"]
                answers[name].append(model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False))
        rates: dict[str, dict[str, float]] = {}
        for k, m in tqdm(SPLITS, desc="shallow drafts"):
            model.model.layers = torch.nn.ModuleList([*layers[:k], *layers[-m:]])
            rates[f"{k},{m}"] = {name: _hit_rate(model, seqs, new_tokens) for name, seqs in answers.items()}
        model.model.layers = layers
    return write("self-draft", {
        "environment": environment(),
        "method": "teacher-forced next-token agreement of embeddings + first K + last M layers with the full model's greedy answer",
        "new_tokens": new_tokens, "prompts_per_set": per_set, "acceptance": rates,
    })


def _hit_rate(model: torch.nn.Module, sequences: list[torch.Tensor], new_tokens: int) -> float:
    hits = 0
    for seq in sequences:
        start = seq.shape[1] - new_tokens
        guess = model(seq, use_cache=False).logits.argmax(-1)[0, start - 1:-1]
        hits += int((guess == seq[0, start:]).sum())
    return hits / (new_tokens * len(sequences))
