"""Train a draft head by self-distillation (EAGLE-1): the model answers a prompt set greedily, its
final-norm features are recorded teacher-forced, and the head learns to predict the next feature
(smooth L1) and the next token (cross-entropy through the frozen LM head, over the draft vocabulary).

The head only needs the embeddings, the LM head and the final features, which every split shares
(the split is exact), so data comes from the unsplit model: far faster than running the split, and
the same numbers. `--split` only sets the size budget (the head must stay within 5% of the device's
parts: the MLP width is chosen to fit) and is recorded.

    lambdasplit train-draft --model SRC --split K,M --out DIR [--prompts FILE] [--epochs N] [--device cpu|cuda]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lambdasplit.device.draft import PROMPTS, Drafter, DraftHead, DraftHeadCandidates, embedding_fingerprint
from lambdasplit.errors import LambdaSplitError
from lambdasplit.split.load import open_source

log = logging.getLogger(__name__)
progress = logging.getLogger("lambdasplit.progress")

SIZE_BUDGET = 0.05  # of the device's parameters


@dataclass
class TrainSettings:
    epochs: int = 6
    lr: float = 1e-3
    batch: int = 16  # sequences per training step
    gen_batch: int = 32  # prompts answered at once
    max_new_tokens: int = 128
    draft_vocab: int = 8192
    intermediate_size: int | None = None  # None: the widest MLP (multiple of 32) within the size budget
    noise: float = 0.1  # feature noise (relative to their RMS) so the head tolerates its own errors
    ce_weight: float = 0.1
    seed: int = 0
    limit: int | None = None  # only the first N prompts (tests)
    heldout_limit: int | None = None
    draft_tokens: int = 8  # chain length of the acceptance measurement


@dataclass
class Sample:
    ids: torch.Tensor  # (T,) prompt + greedy answer
    answer: int  # index of the first answer token
    features: torch.Tensor  # (T - 1, H) final-norm features of every position but the last


def load_prompts(path: Path | None, name: str = "train_prompts.json") -> list[str]:
    """A JSON list of prompt strings (default: the shipped set)."""
    path = path or PROMPTS / name
    try:
        prompts = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LambdaSplitError(f"--prompts {path}: {exc}") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise LambdaSplitError(f"--prompts {path}: expected a JSON list of non-empty strings")
    return prompts


def chat_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    if tokenizer.chat_template is None:
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], settings: TrainSettings,
           desc: str) -> list[Sample]:
    """Greedy answers in left-padded batches (sorted by length, so little padding), cut after EOS,
    with the final norm's output at every position but the last, recorded while generating (the
    same features a teacher-forced pass would give, without paying for that pass)."""
    device = model.device
    encoded = sorted(((chat_ids(tokenizer, p), i) for i, p in enumerate(prompts)), key=lambda e: len(e[0]))
    eos = set(_eos_ids(model))
    pad = model.generation_config.pad_token_id or next(iter(eos), 0)
    samples: list[Sample | None] = [None] * len(prompts)
    steps: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_hook(lambda module, args, out: steps.append(out.to("cpu", torch.float32)))
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    try:
        for start in range(0, len(encoded), settings.gen_batch):
            chunk = encoded[start:start + settings.gen_batch]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
            steps.clear()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad)
            features = torch.cat(steps, dim=1)  # (B, width + new tokens - 1, H)
            for row, (prompt, index) in enumerate(chunk):
                new = out[row, width:].tolist()
                cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
                offset = width - len(prompt)
                count = len(prompt) + cut
                samples[index] = Sample(torch.tensor(prompt + new[:cut]), len(prompt), features[row, offset:offset + count - 1].clone())
            bar.update(len(chunk))
    finally:
        hook.remove()
        bar.close()
    return [s for s in samples if s is not None]


def _eos_ids(model: PreTrainedModel) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def draft_vocabulary(samples: list[Sample], size: int, always: list[int]) -> torch.Tensor:
    """The `size` most frequent answer tokens (and EOS): the rows of the LM head the draft scores."""
    counts = torch.bincount(torch.cat([s.ids[s.answer:] for s in samples]))
    ranked = [t for t in torch.argsort(counts, descending=True, stable=True).tolist() if counts[t] > 0]
    chosen = list(dict.fromkeys(always + ranked))[:size]
    return torch.tensor(sorted(chosen))


def fit_intermediate(config: Any, device_params: int, budget: float = SIZE_BUDGET) -> int:
    """The widest MLP (a multiple of 32) that keeps fc + one decoder layer within `budget` of the
    device's parameters."""
    text = config.get_text_config()
    probe = DraftHead(config, 32, torch.zeros(1))
    base = sum(p.numel() for p in probe.parameters()) - 3 * text.hidden_size * 32
    width = int((budget * device_params - base) // (3 * text.hidden_size)) // 32 * 32
    if width < 32:
        raise LambdaSplitError(f"a draft head does not fit in {budget:.0%} of this split's device parts "
                               f"({device_params:,} parameters); choose a split with more device layers")
    return min(width, int(text.intermediate_size))


def train(head: DraftHead, samples: list[Sample], embed: torch.nn.Module, lm_rows: torch.Tensor, settings: TrainSettings,
          device: torch.device) -> list[float]:
    """EAGLE-1's objective; returns the mean loss of every epoch."""
    index = torch.full((int(embed.weight.shape[0]),), -100, dtype=torch.long)
    index[head.vocab] = torch.arange(len(head.vocab))
    scale = torch.cat([s.features for s in samples]).pow(2).mean().sqrt()
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))
    batches = [order[i:i + settings.batch] for i in range(0, len(order), settings.batch)]
    total = settings.epochs * len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / total)))
    rng = random.Random(settings.seed)
    losses = []
    head.train()
    for epoch in range(settings.epochs):
        rng.shuffle(batches)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{settings.epochs}", unit="batch")
        epoch_loss, weight = 0.0, 0
        for chunk in bar:
            loss, count = _batch_loss(head, [samples[i] for i in chunk], embed, lm_rows, index, scale, settings, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item() * count
            weight += count
            bar.set_postfix(loss=f"{epoch_loss / max(weight, 1):.4f}")
        losses.append(epoch_loss / max(weight, 1))
        progress.info("epoch %d/%d: loss %.4f", epoch + 1, settings.epochs, losses[-1])
    head.eval()
    return losses


def _batch_loss(head: DraftHead, chunk: list[Sample], embed: torch.nn.Module, lm_rows: torch.Tensor, index: torch.Tensor,
                scale: torch.Tensor, settings: TrainSettings, device: torch.device) -> tuple[torch.Tensor, int]:
    """Pairs (f_i, x_(i+1)) predict f_(i+1) and x_(i+2), counted where x_(i+2) is an answer token."""
    width = max(len(s.ids) for s in chunk)
    ids = torch.stack([F.pad(s.ids, (0, width - len(s.ids))) for s in chunk]).to(device)
    feats = torch.stack([F.pad(s.features, (0, 0, 0, width - 1 - len(s.features))) for s in chunk]).to(device)
    mask = torch.zeros(len(chunk), width - 2, dtype=torch.bool, device=device)
    for row, s in enumerate(chunk):
        mask[row, max(s.answer - 2, 0):len(s.ids) - 2] = True
    with torch.no_grad():
        emb = embed(ids[:, 1:]).float()
    inputs = feats
    if settings.noise:
        inputs = inputs + torch.randn_like(inputs) * settings.noise * scale
    positions = torch.arange(width - 1, device=device)[None].expand(len(chunk), -1)
    predicted = head(inputs, emb, positions)[:, :-1]
    target = feats[:, 1:]
    regression = F.smooth_l1_loss(predicted[mask] / scale, target[mask] / scale)
    logits = predicted[mask] @ lm_rows.T
    labels = index.to(device)[ids[:, 2:][mask]]
    ce = F.cross_entropy(logits, labels, ignore_index=-100) if bool((labels >= 0).any()) else logits.sum() * 0
    return regression + settings.ce_weight * ce, int(mask.sum())


class _Replay:
    """Stands for a SplitCache when drafting is replayed over recorded answers: only its length and
    the hooks the candidate generator sets."""

    def __init__(self) -> None:
        self.length = 0
        self.on_features = None
        self.draft_stats = None

    def get_seq_length(self) -> int:
        return self.length


@torch.inference_mode()
def replay_acceptance(drafter: Drafter, samples: list[Sample], draft_tokens: int, confidence: float) -> dict[str, float]:
    """Greedy speculative decoding replayed over the model's own greedy answers with the real
    candidate generator: tokens per round trip (the prefill's trip included, as the benchmarks
    count them), and the share of drafted tokens accepted."""
    config = GenerationConfig(do_sample=False, max_length=1 << 30, num_assistant_tokens=draft_tokens,
                              assistant_confidence_threshold=confidence)
    config._eos_token_tensor = None
    tokens = trips = drafted = accepted = 0
    for s in tqdm(samples, desc="acceptance", unit="answer"):
        cache = _Replay()
        generator = DraftHeadCandidates(drafter, cache, config, None)
        ids, end = s.ids[None], len(s.ids)
        cache.length = s.answer
        generator._record(s.features[None, : s.answer])
        length, rounds = s.answer + 1, 1
        while length < end:
            candidates, _ = generator.get_candidates(ids[:, :length])
            draft = candidates[0, length:]
            truth = ids[0, length:length + len(draft)]
            matches = int((draft[: len(truth)] == truth).long().cumprod(0).sum())
            generator.update_candidate_strategy(ids, None, matches)
            cache.length = length + matches
            generator._record(s.features[None, length - 1:length + matches])
            length, rounds = length + matches + 1, rounds + 1
        tokens += end - s.answer
        trips += rounds
        drafted += generator.stats.drafted
        accepted += generator.stats.accepted
    return {"tokens_per_round_trip": tokens / max(trips, 1), "acceptance": accepted / max(drafted, 1),
            "drafted": drafted, "answers": len(samples), "answer_tokens": tokens}


def train_draft(source: str | None, split: tuple[int, int] | None, out: Path, prompts: Path | None = None,
                device: str = "cpu", settings: TrainSettings | None = None, data_file: Path | None = None) -> dict[str, Any]:
    """Generate the data, train, measure acceptance on the held-out chat set, and write the head
    (safetensors + json with how it was trained) to `out`. `data_file` keeps the generated answers
    and features (safetensors) for the next run with the same model, prompts and answer length."""
    from lambdasplit.device.draft import CONFIDENCE

    settings = settings or TrainSettings()
    torch.manual_seed(settings.seed)
    began = time.perf_counter()
    opened = open_source(source, split)
    opened.require("device")
    if opened.exported is not None:
        raise LambdaSplitError("train-draft needs the whole model (--model SRC), not an exported part")
    path = opened.checkpoint.path
    target = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(target).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train_prompts = load_prompts(prompts)[: settings.limit]
    heldout = load_prompts(None, "heldout_chat.json")[: settings.heldout_limit]
    key = _data_key(model, train_prompts + ["--held-out--"] + heldout, settings.max_new_tokens)
    cached = read_data(data_file, key) if data_file is not None and data_file.exists() else None
    if cached is None:
        cached = (answer(model, tokenizer, train_prompts, settings, "answers (train)"),
                  answer(model, tokenizer, heldout, settings, "answers (held-out)"))
        if data_file is not None:
            write_data(data_file, key, *cached)
    else:
        progress.info("answers and features from %s", data_file)
    data, test = cached
    generated = time.perf_counter()

    spec = opened.spec
    device_params = _device_params(model, spec.k, spec.m)
    width = settings.intermediate_size or fit_intermediate(model.config, device_params)
    vocab = draft_vocabulary(data, settings.draft_vocab, _eos_ids(model))
    head = DraftHead(model.config, width, vocab).to(target)
    head_params = sum(p.numel() for p in head.parameters())
    embed = model.get_input_embeddings()
    lm_rows = model.get_output_embeddings().weight[vocab.to(target)].detach()
    losses = train(head, data, embed, lm_rows, settings, target)
    trained = time.perf_counter()

    drafter = Drafter(head, embed, model.get_output_embeddings(), model.config,
                      getattr(model.config, "final_logit_softcapping", None))
    measured = replay_acceptance(drafter, [_to(s, target) for s in test], settings.draft_tokens, CONFIDENCE)
    progress.info("held-out chat: %.2f tokens per round trip, %.0f%% of drafted tokens accepted",
                  measured["tokens_per_round_trip"], 100 * measured["acceptance"])
    meta = {
        "model_type": model.config.model_type, "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
        "intermediate_size": width, "draft_vocab": len(vocab), "feature": "final norm output (post-norm last hidden state)",
        "embedding_fingerprint": embedding_fingerprint(embed.weight), "model": path.name,
        "size": {"head_parameters": head_params, "device_parameters": device_params, "split": [spec.k, spec.m],
                 "ratio": head_params / device_params},
        "training": {
            "method": "self-distillation (EAGLE-1): greedy answers of the model; smooth L1 on the next final-norm feature "
                      f"+ {settings.ce_weight} x cross-entropy of the next token through the frozen LM head (draft vocabulary)",
            "prompts": len(train_prompts), "prompt_file": str(prompts) if prompts else "draft_data/train_prompts.json",
            "answer_tokens": sum(len(s.ids) - s.answer for s in data), "positions": sum(len(s.ids) for s in data),
            "settings": asdict(settings), "epoch_losses": losses, "device": device,
            "seconds": {"data": round(generated - began, 1), "training": round(trained - generated, 1)},
        },
        "heldout_chat": {"prompts": len(heldout), "confidence": CONFIDENCE, **measured},
    }
    head.save(Path(out), meta)
    return meta


def _data_key(model: PreTrainedModel, prompts: list[str], max_new_tokens: int) -> str:
    """What the generated data depends on: the model's embeddings, the prompts, the answer length."""
    text = json.dumps([embedding_fingerprint(model.get_input_embeddings().weight), prompts, max_new_tokens])
    return hashlib.sha256(text.encode()).hexdigest()


def write_data(path: Path, key: str, data: list[Sample], test: list[Sample]) -> None:
    samples = data + test
    save_file({
        "ids": torch.cat([s.ids for s in samples]), "features": torch.cat([s.features for s in samples]),
        "lengths": torch.tensor([len(s.ids) for s in samples]), "answers": torch.tensor([s.answer for s in samples]),
    }, str(path), metadata={"key": key, "train": str(len(data))})


def read_data(path: Path, key: str) -> tuple[list[Sample], list[Sample]] | None:
    """The samples `write_data` stored under the same key, else None (they are regenerated)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            progress.info("%s holds data for other prompts or another model; generating anew", path)
            return None
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    ids, feats = tensors["ids"].split(tensors["lengths"].tolist()), tensors["features"].split((tensors["lengths"] - 1).tolist())
    samples = [Sample(i, int(a), f) for i, a, f in zip(ids, tensors["answers"].tolist(), feats, strict=True)]
    train_count = int(meta["train"])
    return samples[:train_count], samples[train_count:]


def _to(sample: Sample, device: torch.device) -> Sample:
    return Sample(sample.ids.to(device), sample.answer, sample.features.to(device))


def _device_params(model: PreTrainedModel, k: int, m: int) -> int:
    """Parameters of the device's parts: embeddings, K + M layers, final norm, the LM head unless tied."""
    layers = model.model.layers
    count = sum(p.numel() for layer in [*layers[:k], *layers[len(layers) - m:]] for p in layer.parameters())
    count += sum(p.numel() for p in model.get_input_embeddings().parameters()) + sum(p.numel() for p in model.model.norm.parameters())
    if not getattr(model.config, "tie_word_embeddings", False):
        count += model.get_output_embeddings().weight.numel()
    return count
