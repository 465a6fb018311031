"""The audit of the identifier defenses (pseudonymisation, decoy rows) on the held-out prompt set.

What it measures, and why each way:
- detector recall per kind, on every prompt: a missed identifier is sent as it is, so recall bounds
  the leak from below;
- real identifiers recovered verbatim by the curious cloud's vocabulary matching on the captured
  frames, undefended and pseudonymised (the attack is the audit's, run on the real frames);
- quality: the share of restored greedy answers equal to the unprotected answer, with a judgement of
  each difference (does the answer reproduce the identifier, where does it first differ);
- decoys: the attacker's success at naming the real row and the real identifiers with the
  distinguishers of privacy/distinguish.py, against 1/(N + 1);
- cost: bytes and seconds per generated token for N decoys (`decoy_cost`, also for the GPU).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources

from lambdasplit import defaults
from lambdasplit.device.body import BodyClient
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import load_local_body
from lambdasplit.errors import LambdaSplitError
from lambdasplit.privacy.attacks import Attacker
from lambdasplit.privacy.capture import observe, positions
from lambdasplit.privacy.distinguish import DISTINGUISHERS, Distinguisher
from lambdasplit.privacy.metrics import rouge_l
from lambdasplit.privacy.protect import ProtectedChat, Protection
from lambdasplit.privacy.pseudonym import KINDS, Detector, Pseudonymizer, StandIns
from lambdasplit.split.load import open_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PiiSample:
    prompt: str
    language: str
    pii: tuple[tuple[str, str], ...]  # (text, kind)


PII_PROMPT_SETS = ("heldout", "tune")


def load_pii_prompts(name: str = defaults.PII_PROMPT_SET, limit: int | None = None) -> list[PiiSample]:
    """`heldout` (what the docs report) or `tune` (what the detector was adjusted on)."""
    text = resources.files("lambdasplit.privacy").joinpath(f"data/pii-{name}.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [PiiSample(r["prompt"], r["language"], tuple((p["text"], p["kind"]) for p in r["pii"])) for r in rows][:limit]


@dataclass
class PiiAuditConfig:
    source: str | None = None
    split: tuple[int, int] = defaults.SPLIT
    prompt_set: str = defaults.PII_PROMPT_SET
    prompts: int | None = None  # quality and decoy prompts (default: all)
    attack_prompts: int = defaults.PII_ATTACK_PROMPTS
    decoy_checks: int = 8  # prompts whose real row under N = 3 decoys is compared with the undefended answer
    decoys: tuple[int, ...] = defaults.PII_DECOYS
    max_new_tokens: int = defaults.AUDIT_MAX_NEW_TOKENS
    budget: int = 512
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_set not in PII_PROMPT_SETS:
            raise LambdaSplitError(f"identifier set {self.prompt_set!r}: expected {' or '.join(PII_PROMPT_SETS)}")


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def detector_recall(samples: list[PiiSample], detector: Detector, seed: int = 0) -> dict:
    """Per kind: planted identifiers and the share the pseudonymised text no longer contains verbatim."""
    per_kind: dict[str, list[int]] = {}
    misses = []
    for i, sample in enumerate(samples):
        sent = Pseudonymizer(detector, StandIns(seed + i)).pseudonymize(sample.prompt).text
        for text, kind in sample.pii:
            hidden = text not in sent
            per_kind.setdefault(kind, []).append(int(hidden))
            if not hidden:
                misses.append({"prompt": i, "kind": kind, "text": text})
    ordered = sorted(per_kind.items(), key=lambda kv: KINDS.index(kv[0]))
    table = {k: {"planted": len(v), "hidden": sum(v), "recall": sum(v) / len(v)} for k, v in ordered}
    total = [x for v in per_kind.values() for x in v]
    return {"per_kind": table, "overall": sum(total) / len(total), "planted": len(total), "misses": misses}


def run_pii_audit(config: PiiAuditConfig, progress: Callable[[str, int, int], None] = lambda *_: None) -> dict:
    samples = load_pii_prompts(config.prompt_set, config.prompts)
    detector = Detector()
    runtime = SplitRuntime.load(config.source, config.split)
    options = SamplingParams(max_new_tokens=config.max_new_tokens)
    n_attack, n_checks = min(config.attack_prompts, len(samples)), min(config.decoy_checks, len(samples))
    total = len(samples) * 2 + n_attack * 2 + n_checks + 2 * len(samples) + 1
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        progress(label, done, total)

    recall = detector_recall(samples, detector, config.seed)
    quality, base_answers = [], []
    for i, sample in enumerate(samples):
        body = load_local_body(config.source, config.split)
        base = runtime.generate_ids(body, runtime.encode_chat(_messages(sample.prompt)), None, options)
        base_answers.append(base)
        step(f"unprotected answer {i + 1}/{len(samples)}")
        chat = ProtectedChat(runtime, Protection(pseudonymize=True, seed=config.seed + i), detector)
        protected = chat.generate(body, _messages(sample.prompt), options)
        quality.append(_judge(base.text, protected.text, sample, protected.sent_text))
        step(f"pseudonymised answer {i + 1}/{len(samples)}")

    attacker = Attacker(open_source(config.source, None, allow_shallow=True), budget=config.budget)
    attacks = []
    for i, sample in enumerate(samples[:n_attack]):
        row = {"prompt": i}
        for mode in ("none", "pseudonymize"):
            body = load_local_body(config.source, config.split)
            body.captured = []
            chat = ProtectedChat(runtime, Protection(pseudonymize=mode == "pseudonymize", seed=config.seed + i), detector)
            result = chat.generate(body, _messages(sample.prompt), options)
            recovered = _recover_prompt(attacker, runtime, body.captured, len(result.result.prompt_token_ids[0]), 0)
            row[mode] = {
                "real_recovered": _share([p for p, _ in sample.pii], recovered),
                "stand_ins_recovered": _share([s for _, _, s in result.replacements if s in result.cloud_prompt], recovered),
                "recovered_text": recovered,
            }
            step(f"attacking {mode} frames {i + 1}/{n_attack}")
        attacks.append(row)

    checks = []
    for i, sample in enumerate(samples[:n_checks]):
        body = load_local_body(config.source, config.split)
        chat = ProtectedChat(runtime, Protection(decoys=3, seed=config.seed + i), detector)
        result = chat.generate(body, _messages(sample.prompt), options)
        checks.append({"prompt": i, "real_row": result.real_row, "equal": result.token_ids == base_answers[i].token_ids[0],
                       "length_matched": len(set(map(len, result.result.prompt_token_ids))) == 1})
        step(f"decoy rows: real row vs undefended {i + 1}/{n_checks}")

    distinguishers = [cls(runtime, detector) for cls in DISTINGUISHERS]
    decoy_rows = []
    for mode in ("decoys", "pseudonymize+decoys"):
        for i, sample in enumerate(samples):
            decoy_rows.append(_decoy_trial(runtime, detector, distinguishers, sample, mode, max(config.decoys), config.seed + i, config.decoys))
            step(f"decoy distinguishers ({mode}) {i + 1}/{len(samples)}")

    cost = decoy_cost(runtime, lambda: load_local_body(config.source, config.split), _messages(samples[0].prompt), (0, *config.decoys),
                      SamplingParams(max_new_tokens=config.max_new_tokens))
    step("cost per token")
    return {"config": {**asdict(config), "split": list(config.split)}, "recall": recall, "quality": quality,
            "quality_summary": _quality_summary(quality), "attacks": attacks, "attack_summary": _attack_summary(attacks),
            "decoy_checks": checks, "decoys": decoy_rows, "decoy_summary": _decoy_summary(decoy_rows, config.decoys), "cost": cost}


def _recover_prompt(attacker: Attacker, runtime: SplitRuntime, captured: list, prompt_len: int, row: int) -> str:
    """The curious cloud's vocabulary matching (K known) on one row's prompt positions, decoded."""
    seen = observe(captured)
    prompt_states = positions(seen.uplink[:1], row)[-prompt_len:]
    ids = attacker.match(runtime.spec.k, prompt_states).token_ids
    return runtime.tokenizer.decode(ids, skip_special_tokens=True)


def _share(items: list[str], text: str) -> float | None:
    return sum(item in text for item in items) / len(items) if items else None


def _judge(base: str, restored: str, sample: PiiSample, sent: str) -> dict:
    """Equal, or how the restored answer differs: whether the unprotected answer reproduces an identifier
    (the answer then depends on the identifier itself), and how much of the text agrees."""
    mentions = [p for p, _ in sample.pii if p in base or any(part in base for part in p.split() if len(part) > 3)]
    prefix = next((i for i, (a, b) in enumerate(zip(base, restored, strict=False)) if a != b), min(len(base), len(restored)))
    verdict = "equal" if base == restored else ("identifier-dependent" if mentions else "differs")
    return {"equal": base == restored, "verdict": verdict, "common_prefix_chars": prefix, "mentions_identifier": bool(mentions),
            "rouge_l_chars": rouge_l(list(restored), list(base)), "base": base, "restored": restored, "sent": sent}


def _quality_summary(quality: list[dict]) -> dict:
    verdicts = [q["verdict"] for q in quality]
    return {"prompts": len(quality), "equal": statistics.mean(float(q["equal"]) for q in quality),
            "identifier_dependent": verdicts.count("identifier-dependent") / len(quality),
            "differs_otherwise": verdicts.count("differs") / len(quality),
            "rouge_l_of_differences": statistics.mean([q["rouge_l_chars"] for q in quality if not q["equal"]] or [1.0])}


def _attack_summary(attacks: list[dict]) -> dict:
    def mean(mode: str, key: str) -> float | None:
        values = [a[mode][key] for a in attacks if a[mode][key] is not None]
        return statistics.mean(values) if values else None

    return {mode: {"real_recovered": mean(mode, "real_recovered"), "stand_ins_recovered": mean(mode, "stand_ins_recovered")}
            for mode in ("none", "pseudonymize")}


def _decoy_trial(runtime: SplitRuntime, detector: Detector, distinguishers: list[Distinguisher], sample: PiiSample, mode: str,
                 n_max: int, seed: int, ns: tuple[int, ...]) -> dict:
    """Rows for N = n_max; smaller N use the real row and the first N decoys (decoy rows are drawn independently)."""
    chat = ProtectedChat(runtime, Protection(pseudonymize=mode != "decoys", decoys=n_max, seed=seed), detector)
    batch = chat.prepare(_messages(sample.prompt))
    texts = [runtime.tokenizer.apply_chat_template(r, add_generation_prompt=True, tokenize=False) for r in batch.rows]
    scores = {d.name: d.scores(texts, batch.values) for d in distinguishers}
    out = {"mode": mode, "length_matched": batch.length_matched, "by_n": {}}
    order = [batch.real_row] + [i for i in range(len(texts)) if i != batch.real_row]
    for n in ns:
        rows = order[: n + 1]
        result = {}
        for name, s in scores.items():
            # The attacker names a row among the best-scoring ones uniformly: the expected success over ties.
            best = max(s[r] for r in rows)
            ties = [r for r in rows if s[r] == best]
            found = [_share([p for p, _ in sample.pii], batch.rows[r][0]["content"]) or 0.0 for r in ties]
            result[name] = {"row": (batch.real_row in ties) / len(ties), "identifiers": sum(found) / len(ties)}
        out["by_n"][str(n)] = result
    return out


def _decoy_summary(rows: list[dict], ns: tuple[int, ...]) -> list[dict]:
    out = []
    for mode in ("decoys", "pseudonymize+decoys"):
        items = [r for r in rows if r["mode"] == mode]
        if not items:
            continue
        for n in ns:
            entry = {"mode": mode, "n": n, "chance": 1 / (n + 1), "length_matched": statistics.mean(float(r["length_matched"]) for r in items)}
            for name in items[0]["by_n"][str(n)]:
                entry[f"{name}_row"] = statistics.mean(float(r["by_n"][str(n)][name]["row"]) for r in items)
                entry[f"{name}_identifiers"] = statistics.mean(r["by_n"][str(n)][name]["identifiers"] for r in items)
            out.append(entry)
    return out


def decoy_cost(runtime: SplitRuntime, body_factory: Callable[[], BodyClient], messages: list[dict[str, str]],
               ns: tuple[int, ...] = (0, 1, 3, 7), options: SamplingParams | None = None, repeats: int = 1) -> list[dict]:
    """Bytes and seconds per generated token with N decoy rows, on whatever body `body_factory` opens
    (in process on the CPU here; a `RemoteBody` to a GPU server for the GPU number). Every N generates
    the same number of tokens (decoy batches run to max_new_tokens); the best of `repeats` runs counts."""
    options = options or SamplingParams(max_new_tokens=32)
    out = []
    for n in ns:
        best = None
        for r in range(repeats):
            body = body_factory()
            try:
                chat = ProtectedChat(runtime, Protection(decoys=n, seed=r))
                start = time.perf_counter()
                result = chat.generate(body, messages, options, eos_token_id=None).result
                seconds = time.perf_counter() - start
            finally:
                body.close()
            tokens = max(len(t) for t in result.token_ids) if n else len(result.token_ids[0])
            steps = len(result.timings.steps)
            row = {"n": n, "rows": n + 1, "forwards": steps, "bytes_to_cloud_per_token": result.bytes_to_cloud / steps,
                   "bytes_from_cloud_per_token": result.bytes_from_cloud / steps, "seconds": seconds, "tokens": tokens,
                   "decode_seconds_per_token": (result.timings.total - result.timings.prefill) / max(steps - 1, 1),
                   "prefill_seconds": result.timings.prefill}
            if best is None or row["decode_seconds_per_token"] < best["decode_seconds_per_token"]:
                best = row
        out.append(best)
    base = out[0]["decode_seconds_per_token"] if out and out[0]["n"] == 0 else None
    for row in out:
        row["time_vs_n0"] = row["decode_seconds_per_token"] / base if base else None
    return out
