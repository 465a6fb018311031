"""Train a draft head by self-distillation (EAGLE): the model answers a prompt set (greedy, plus
sampled answers at a moderate temperature for a share of the prompts, to widen what the head sees),
its final-norm features are recorded while it generates, and the head learns to predict the next
feature (smooth L1) and the model's next-token distribution (cross-entropy through the frozen LM
head, over the draft vocabulary, against the model's own probabilities as in EAGLE-1).

Drafting feeds the head its own predicted features from the second drafted token on, so training
also unrolls the head (`TrainSettings.unroll` passes, as EAGLE-3's training-time test does): pass
k reads the features pass k - 1 predicted, and learns the same targets. The first pass reads the
real features with noise (EAGLE-1's augmentation), so the head tolerates its own errors.

The head only needs the embeddings, the LM head and the final features, which every split shares
(the split is exact), so data comes from the unsplit model: far faster than running the split, and
the same numbers. `--split` only sets the size budget (the head must stay within 5% of the device's
parts: the MLP width is chosen to fit) and is recorded. A time budget (`max_minutes`) splits the
run into generation, training and measurement, each stopping gracefully at its share.

    lambdasplit train-draft --model SRC --split K,M --out DIR [--device cuda] [--max-minutes M]

Why one file over 500 lines: it is one command's pipeline (data, training, held-out measurement)
under one time budget and one cache key; the head itself (`draft.py`) and the prompts
(`draft_prompts.py`) are apart, and each stage here is a function of its own.
"""

from __future__ import annotations

import copy
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

from lambdasplit import defaults
from lambdasplit.device import draft_prompts
from lambdasplit.device.draft import Drafter, DraftHead, DraftHeadCandidates, embedding_fingerprint
from lambdasplit.device.tree import acceptance_table, reference_ranks
from lambdasplit.errors import LambdaSplitError
from lambdasplit.split.load import open_source

log = logging.getLogger(__name__)
progress = logging.getLogger("lambdasplit.progress")

SIZE_BUDGET = 0.05  # of the device's parameters
TREE_DEPTH, TREE_TOP = 10, 8  # the acceptance measured for draft trees: depths, and ranks per depth
# Shares of --max-minutes: generation ends by the first, training by the second; the rest measures.
GENERATION_SHARE, TRAINING_SHARE = 0.45, 0.85


@dataclass
class TrainSettings:
    epochs: int = defaults.DRAFT_EPOCHS
    lr: float = defaults.DRAFT_LR
    batch: int = defaults.DRAFT_BATCH
    gen_batch: int = defaults.DRAFT_GEN_BATCH
    max_new_tokens: int = defaults.DRAFT_MAX_NEW_TOKENS
    prompt_count: int = defaults.DRAFT_PROMPT_COUNT
    sampled: float = defaults.DRAFT_SAMPLED
    temperature: float = defaults.DRAFT_TEMPERATURE
    validation: float = 0.05  # share of the prompts held out to validate (greedy answers only)
    draft_vocab: int = 8192
    intermediate_size: int | None = None  # None: the widest MLP (multiple of 32) within the size budget
    noise: float = 0.1  # feature noise (relative to their RMS) so the head tolerates its own errors
    ce_weight: float = 1.0  # 0.1 (EAGLE-1) gave 20% of drafts accepted, 1.0 23% (160 answers, 4 epochs, on the CPU)
    hard_labels: bool = False  # cross-entropy of the answer's next token instead of the model's distribution
    unroll: int = 2  # training passes over the head's own predicted features (1: EAGLE-1 only)
    seed: int = 0
    limit: int | None = None  # only the first N prompts (tests)
    heldout_limit: int | None = None
    validation_replays: int = 32  # validation answers the final acceptance replay runs over
    draft_tokens: int = defaults.DRAFT_TOKENS  # chain length of the acceptance measurement
    max_minutes: float | None = None  # whole run, model loading included


@dataclass
class Sample:
    ids: torch.Tensor  # (T,) prompt + answer
    answer: int  # index of the first answer token
    features: torch.Tensor  # (T - 1, H) final-norm features of every position but the last


@dataclass
class Deadlines:
    """Monotonic times at which generation and training stop taking new work (inf: no budget)."""

    generation: float = math.inf
    training: float = math.inf

    @classmethod
    def of(cls, began: float, max_minutes: float | None) -> Deadlines:
        if max_minutes is None:
            return cls()
        seconds = 60 * max_minutes
        return cls(began + GENERATION_SHARE * seconds, began + TRAINING_SHARE * seconds)


def load_prompts(path: Path | None, count: int = 6000, seed: int = 0) -> list[str]:
    """A JSON list of prompt strings, or (no path) `count` generated ones (draft_prompts.py)."""
    if path is None:
        return draft_prompts.generate(count, seed)
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
           desc: str, temperature: float = 0.0, deadline: float = math.inf) -> list[Sample]:
    """The model's answers (greedy, or sampled at `temperature`) in left-padded batches (sorted by
    length, so little padding), cut after EOS, with the final norm's output at every position but
    the last, recorded while generating (the same features a teacher-forced pass would give,
    without paying for that pass). Stops taking batches at `deadline` (fewer answers come back)."""
    device = model.device
    encoded = sorted(((chat_ids(tokenizer, p), i) for i, p in enumerate(prompts)), key=lambda e: len(e[0]))
    eos = set(_eos_ids(model))
    pad = model.generation_config.pad_token_id or next(iter(eos), 0)
    samples: list[Sample | None] = [None] * len(prompts)
    steps: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_hook(lambda module, args, out: steps.append(out.float()))
    sampling = {"do_sample": True, "temperature": temperature, "top_p": None, "top_k": None} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    try:
        for start in range(0, len(encoded), settings.gen_batch):
            if time.monotonic() > deadline:
                progress.info("%s: the time budget for generation is spent after %d of %d prompts", desc, start, len(prompts))
                break
            chunk = encoded[start:start + settings.gen_batch]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
            steps.clear()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                 pad_token_id=pad, **sampling)
            features = torch.cat(steps, dim=1)  # (B, width + new tokens - 1, H)
            for row, (prompt, index) in enumerate(chunk):
                new = out[row, width:].tolist()
                cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
                offset = width - len(prompt)
                count = len(prompt) + cut
                samples[index] = Sample(torch.tensor(prompt + new[:cut], device=device), len(prompt),
                                        features[row, offset:offset + count - 1].clone())
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
    counts = torch.bincount(torch.cat([s.ids[s.answer:].cpu() for s in samples]))
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


@dataclass
class Objective:
    """What the loss needs besides the head: the frozen embeddings, the draft vocabulary's LM head
    rows, the features' RMS (regression and noise scale) and the settings."""

    embed: torch.nn.Module
    lm_rows: torch.Tensor
    scale: torch.Tensor
    settings: TrainSettings
    device: torch.device

    @property
    def autocast(self) -> Any:
        """bf16 autocast on a GPU (the head's weights and the optimizer stay float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")


def train(head: DraftHead, samples: list[Sample], validation: list[Sample], objective: Objective,
          deadline: float = math.inf) -> dict[str, Any]:
    """AdamW with warmup and a cosine schedule; after each epoch, the depth-1 and depth-2 top-1
    agreement with the model on the validation answers, keeping the best epoch's weights. When the
    time budget will not fit the planned epochs, the first epoch's duration shortens the plan (the
    schedule still ends at zero); the second epoch plans again, since the first is slower."""
    settings = objective.settings
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    batches = _batches(samples, settings.batch)
    plan = {"epochs": settings.epochs}

    def rate(step: int) -> float:
        total = plan["epochs"] * len(batches)
        return min(1.0, (step + 1) / max(20, total // 50)) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    rng = random.Random(settings.seed)
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    epoch, fastest = 0, math.inf
    while epoch < plan["epochs"]:
        began = time.monotonic()
        rng.shuffle(batches)
        head.train()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{plan['epochs']}", unit="batch")
        epoch_loss, weight = 0.0, 0
        for chunk in bar:
            loss, count = _batch_loss(head, [samples[i] for i in chunk], objective)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item() * count
            weight += count
            bar.set_postfix(loss=f"{epoch_loss / max(weight, 1):.4f}")
        epoch += 1
        record = {"epoch": epoch, "loss": epoch_loss / max(weight, 1), **validate(head, validation, objective)}
        history.append(record)
        checked = f", validation top-1 depth 1 {record['depth1']:.3f}, depth 2 {record['depth2']:.3f}" if validation else ""
        progress.info("epoch %d/%d: loss %.4f%s", epoch, plan["epochs"], record["loss"], checked)
        score = record.get("depth1", 0.0) + record.get("depth2", 0.0) if validation else -record["loss"]
        if best is None or score > best[0]:
            best = (score, copy.deepcopy(head.state_dict()))
        left = deadline - time.monotonic()
        fastest = min(fastest, time.monotonic() - began)
        if epoch <= 2 and deadline < math.inf:  # the first epoch is slow (allocator, kernels): plan again after the second
            plan["epochs"] = max(epoch, min(settings.epochs, epoch + int(left // fastest)))
        elif left <= 0 and epoch < plan["epochs"]:
            progress.info("the time budget for training is spent after %d epochs", epoch)
            break
    assert best is not None
    head.load_state_dict(best[1])
    head.eval()
    chosen = max(history, key=lambda r: r.get("depth1", 0.0) + r.get("depth2", 0.0) if validation else -r["loss"])
    return {"epochs": epoch, "history": history, "best_epoch": chosen["epoch"]}


def _batches(samples: list[Sample], size: int) -> list[list[int]]:
    """Indices in batches of similar lengths (little padding); shuffled per epoch."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))
    return [order[i:i + size] for i in range(0, len(order), size)]


def _padded(chunk: list[Sample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, W), features (B, W - 1, H), and the mask (B, W - 2) of the pairs
    (f_i, x_(i+1)) whose targets f_(i+1), x_(i+2) lie in the answer."""
    width = max(len(s.ids) for s in chunk)
    ids = torch.stack([F.pad(s.ids, (0, width - len(s.ids))) for s in chunk]).to(device)
    feats = torch.stack([F.pad(s.features, (0, 0, 0, width - 1 - len(s.features))) for s in chunk]).to(device)
    mask = torch.zeros(len(chunk), width - 2, dtype=torch.bool, device=device)
    for row, s in enumerate(chunk):
        mask[row, max(s.answer - 2, 0):len(s.ids) - 2] = True
    return ids, feats, mask


def _unrolled(head: DraftHead, ids: torch.Tensor, feats: torch.Tensor, objective: Objective,
              noise: bool) -> list[torch.Tensor]:
    """Predicted features (B, W - 2, H) of each unrolled pass: pass 1 reads the real features
    (noised in training), pass k the features pass k - 1 predicted (the real first one)."""
    with torch.no_grad():
        emb = objective.embed(ids[:, 1:]).float()
    inputs = feats
    if noise and objective.settings.noise:
        inputs = inputs + torch.randn_like(inputs) * objective.settings.noise * objective.scale
    positions = torch.arange(feats.shape[1], device=feats.device)[None].expand(len(ids), -1)
    passes = []
    for _ in range(max(1, objective.settings.unroll)):
        with objective.autocast:
            predicted = head(inputs, emb, positions).float()
        passes.append(predicted[:, :-1])
        inputs = torch.cat([feats[:, :1], predicted[:, :-1].detach()], dim=1)
    return passes


def _batch_loss(head: DraftHead, chunk: list[Sample], objective: Objective) -> tuple[torch.Tensor, int]:
    """Per pass: smooth L1 on f_(i+1) (in units of the features' RMS) + ce_weight x the
    cross-entropy of the draft's token distribution against the model's (both through the LM
    head's draft-vocabulary rows); the passes' mean."""
    ids, feats, mask = _padded(chunk, objective.device)
    target = feats[:, 1:][mask]
    with torch.no_grad():
        teacher = (target @ objective.lm_rows.T).softmax(dim=-1)
        if objective.settings.hard_labels:  # a near-uniform model (a tiny random one) never makes a confident head
            index = torch.full((int(objective.embed.weight.shape[0]),), -1, dtype=torch.long, device=objective.device)
            index[head.vocab] = torch.arange(len(head.vocab), device=objective.device)
            labels = index[ids[:, 2:][mask]]
            teacher = F.one_hot(labels.clamp_min(0), teacher.shape[-1]).to(teacher.dtype) * (labels >= 0)[:, None]
    total = torch.zeros((), device=objective.device)
    passes = _unrolled(head, ids, feats, objective, noise=True)
    for predicted in passes:
        guess = predicted[mask]
        regression = F.smooth_l1_loss(guess / objective.scale, target / objective.scale)
        # the cross-entropy less the teacher's entropy (KL): the same gradient, and 0 when learnt
        ce = (torch.special.xlogy(teacher, teacher) - teacher * (guess @ objective.lm_rows.T).log_softmax(dim=-1)).sum(dim=-1).mean()
        total = total + regression + objective.settings.ce_weight * ce
    return total / len(passes), int(mask.sum())


@torch.no_grad()
def validate(head: DraftHead, samples: list[Sample], objective: Objective) -> dict[str, float]:
    """Share of answer positions where the draft's top token (draft vocabulary) is the model's top
    token (full vocabulary), reading real features (depth 1) and its own (depth 2): the chance that
    the first and second drafted tokens are accepted."""
    if not samples:
        return {}
    head.eval()
    hits = [0, 0]
    count = 0
    vocab = head.vocab.to(objective.device)
    settings = copy.copy(objective.settings)
    settings.unroll = 2
    unrolled = Objective(objective.embed, objective.lm_rows, objective.scale, settings, objective.device)
    for chunk in _batches(samples, objective.settings.batch):
        ids, feats, mask = _padded([samples[i] for i in chunk], objective.device)
        truth = ids[:, 2:][mask]
        for depth, predicted in enumerate(_unrolled(head, ids, feats, unrolled, noise=False)):
            hits[depth] += int((vocab[(predicted[mask] @ objective.lm_rows.T).argmax(dim=-1)] == truth).sum())
        count += int(mask.sum())
    return {"depth1": hits[0] / max(count, 1), "depth2": hits[1] / max(count, 1)}


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
    count them), the share of drafted tokens accepted, and (for benchmarks/draft_tree.py) the
    round trips, the seconds spent drafting and how many chains had each length."""
    config = GenerationConfig(do_sample=False, max_length=1 << 30, num_assistant_tokens=draft_tokens,
                              assistant_confidence_threshold=confidence)
    config._eos_token_tensor = None
    tokens = trips = drafted = accepted = 0
    seconds = 0.0
    lengths = [0] * (draft_tokens + 1)
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
        seconds += generator.stats.seconds
        for count in generator.stats.lengths:
            lengths[count] += 1
        lengths[0] += rounds - 1 - len(generator.stats.lengths)  # verifications of no draft (a plain step)
    return {"tokens_per_round_trip": tokens / max(trips, 1), "acceptance": accepted / max(drafted, 1),
            "drafted": drafted, "accepted": accepted, "answers": len(samples), "answer_tokens": tokens, "round_trips": trips,
            "draft_seconds": seconds, "chain_lengths": lengths}


@dataclass
class Data:
    """The generated answers: training (greedy and sampled), validation (greedy answers to training
    prompts set aside) and the held-out chat set's (greedy)."""

    train: list[Sample]
    validation: list[Sample]
    heldout: list[Sample]


def generate_data(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], heldout: list[str],
                  settings: TrainSettings, deadline: float) -> Data:
    """Held-out answers first (they are always measured), then validation, greedy training answers,
    and sampled ones for a `settings.sampled` share of the training prompts, until `deadline`."""
    rng = random.Random(settings.seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    held_back = round(settings.validation * len(prompts)) if len(prompts) > 1 else 0
    validation = [prompts[i] for i in order[:held_back]]
    training = [prompts[i] for i in order[held_back:]]
    test = answer(model, tokenizer, heldout, settings, "answers (held-out chat)")
    val = answer(model, tokenizer, validation, settings, "answers (validation)", deadline=deadline)
    train = answer(model, tokenizer, training, settings, "answers (train, greedy)", deadline=deadline)
    again = [training[i] for i in sorted(rng.sample(range(len(training)), round(settings.sampled * len(training))))]
    if again and time.monotonic() < deadline:
        train += answer(model, tokenizer, again, settings, f"answers (train, t={settings.temperature})",
                        temperature=settings.temperature, deadline=deadline)
    return Data(train, val, test)


def train_draft(source: str | None, split: tuple[int, int] | None, out: Path, prompts: Path | None = None,
                device: str = "cpu", settings: TrainSettings | None = None, data_file: Path | None = None) -> dict[str, Any]:
    """Generate the data, train, measure acceptance on the validation answers and the held-out chat
    set, and write the head (safetensors + json with how it was trained) to `out`. `data_file`
    keeps the generated answers and features (safetensors) for the next run with the same model,
    prompts and generation settings."""
    settings = settings or TrainSettings()
    began = time.monotonic()
    deadlines = Deadlines.of(began, settings.max_minutes)
    torch.manual_seed(settings.seed)
    opened = open_source(source, split)
    opened.require("device")
    if opened.exported is not None:
        raise LambdaSplitError("train-draft needs the whole model (--model SRC), not an exported part")
    path = opened.checkpoint.path
    target = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(target).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train_prompts = load_prompts(prompts, settings.prompt_count, settings.seed)[: settings.limit]
    heldout = draft_prompts.heldout_prompts()[: settings.heldout_limit]
    key = _data_key(model, train_prompts + ["--held-out--"] + heldout, settings)
    data = read_data(data_file, key, target) if data_file is not None and data_file.exists() else None
    if data is None:
        data = generate_data(model, tokenizer, train_prompts, heldout, settings, deadlines.generation)
        if data_file is not None:
            write_data(data_file, key, data)
    else:
        progress.info("answers and features from %s", data_file)
    if target.type == "cuda":  # give generate()'s KV caches back: cuBLAS must still find memory for training
        torch.cuda.empty_cache()
    if not data.train:
        raise LambdaSplitError("no training answers were generated within the time budget; give --max-minutes more")
    generated = time.monotonic()
    progress.info("%d training answers (%d tokens), %d validation, %d held-out, in %.0f s", len(data.train),
                  sum(len(s.ids) - s.answer for s in data.train), len(data.validation), len(data.heldout), generated - began)

    spec = opened.spec
    device_params = _device_params(model, spec.k, spec.m)
    width = settings.intermediate_size or fit_intermediate(model.config, device_params)
    vocab = draft_vocabulary(data.train, settings.draft_vocab, _eos_ids(model))
    head = DraftHead(model.config, width, vocab).to(target)
    head_params = sum(p.numel() for p in head.parameters())
    embed = model.get_input_embeddings()
    lm_rows = model.get_output_embeddings().weight[vocab.to(target)].detach()
    scale = torch.cat([s.features[-64:] for s in data.train]).pow(2).mean().sqrt()
    objective = Objective(embed, lm_rows, scale, settings, target)
    training = train(head, data.train, data.validation, objective, deadlines.training)
    trained = time.monotonic()

    drafter = Drafter(head, embed, model.get_output_embeddings(), model.config,
                      getattr(model.config, "final_logit_softcapping", None))
    measured = replay_acceptance(drafter, data.heldout, settings.draft_tokens, defaults.DRAFT_CONFIDENCE)
    progress.info("held-out chat: %.2f tokens per round trip, %.0f%% of drafted tokens accepted",
                  measured["tokens_per_round_trip"], 100 * measured["acceptance"])
    validation = replay_acceptance(drafter, data.validation[: settings.validation_replays], settings.draft_tokens, defaults.DRAFT_CONFIDENCE)
    calibration = data.validation[: settings.validation_replays]
    ranks = reference_ranks(drafter, calibration, TREE_DEPTH, TREE_TOP)  # the shape of --speculate draft-tree's tree
    greedy = len(train_prompts) - len(data.validation)
    meta = {
        "model_type": model.config.model_type, "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
        "intermediate_size": width, "draft_vocab": len(vocab), "feature": "final norm output (post-norm last hidden state)",
        "embedding_fingerprint": embedding_fingerprint(embed.weight), "model": path.name,
        "size": {"head_parameters": head_params, "device_parameters": device_params, "split": [spec.k, spec.m],
                 "ratio": head_params / device_params},
        "training": {
            "method": "self-distillation (EAGLE): the model's greedy answers, and sampled ones for a share of the prompts; "
                      f"smooth L1 on the next final-norm feature + {settings.ce_weight} x cross-entropy against the model's "
                      f"next-token distribution through the frozen LM head (draft vocabulary), over {settings.unroll} unrolled "
                      "passes (the head reading its own predicted features)",
            "prompts": len(train_prompts), "prompt_file": str(prompts) if prompts else
            f"generated (lambdasplit.device.draft_prompts, {settings.prompt_count} prompts, seed {settings.seed})",
            "answers": len(data.train), "greedy_answers": min(greedy, len(data.train)),
            "answer_tokens": sum(len(s.ids) - s.answer for s in data.train), "positions": sum(len(s.ids) for s in data.train),
            "settings": asdict(settings), "epochs": training["epochs"], "best_epoch": training["best_epoch"],
            "epoch_losses": [r["loss"] for r in training["history"]], "history": training["history"], "device": device,
            "seconds": {"data": round(generated - began, 1), "training": round(trained - generated, 1),
                        "measuring": round(time.monotonic() - trained, 1)},
        },
        "validation": {"prompts": len(data.validation), "confidence": defaults.DRAFT_CONFIDENCE, **validation},
        "heldout_chat": {"prompts": len(heldout), "confidence": defaults.DRAFT_CONFIDENCE, **measured},
        "tree_acceptance": acceptance_table(ranks),
        "tree_calibration": {"prompts": len(calibration), "set": "validation answers", "rank_counts": ranks},
    }
    head.save(Path(out), meta)
    return meta


def _data_key(model: PreTrainedModel, prompts: list[str], settings: TrainSettings) -> str:
    """What the generated data depends on: the model's embeddings, the prompts, the generation settings."""
    generation = [settings.max_new_tokens, settings.sampled, settings.temperature, settings.validation, settings.seed]
    text = json.dumps([embedding_fingerprint(model.get_input_embeddings().weight), prompts, generation])
    return hashlib.sha256(text.encode()).hexdigest()


def write_data(path: Path, key: str, data: Data) -> None:
    samples = data.train + data.validation + data.heldout
    save_file({
        "ids": torch.cat([s.ids for s in samples]).cpu(), "features": torch.cat([s.features for s in samples]).cpu(),
        "lengths": torch.tensor([len(s.ids) for s in samples]), "answers": torch.tensor([s.answer for s in samples]),
    }, str(path), metadata={"key": key, "train": str(len(data.train)), "validation": str(len(data.validation))})


def read_data(path: Path, key: str, device: torch.device) -> Data | None:
    """The samples `write_data` stored under the same key, else None (they are regenerated)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            progress.info("%s holds data for other prompts, settings or another model; generating anew", path)
            return None
        tensors = {name: f.get_tensor(name).to(device) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    ids = tensors["ids"].split(tensors["lengths"].tolist())
    feats = tensors["features"].split((tensors["lengths"] - 1).tolist())
    samples = [Sample(i, int(a), f) for i, a, f in zip(ids, tensors["answers"].tolist(), feats, strict=True)]
    train, val = int(meta["train"]), int(meta["validation"])
    return Data(samples[:train], samples[train:train + val], samples[train + val:])


def _device_params(model: PreTrainedModel, k: int, m: int) -> int:
    """Parameters of the device's parts: embeddings, K + M layers, final norm, the LM head unless tied."""
    layers = model.model.layers
    count = sum(p.numel() for layer in [*layers[:k], *layers[len(layers) - m:]] for p in layer.parameters())
    count += sum(p.numel() for p in model.get_input_embeddings().parameters()) + sum(p.numel() for p in model.model.norm.parameters())
    if not getattr(model.config, "tie_word_embeddings", False):
        count += model.get_output_embeddings().weight.numel()
    return count
