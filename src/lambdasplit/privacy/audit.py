"""The privacy audit: run the split on a prompt set with planted personal data, capture exactly
the frames that crossed, attack them under two threat models, and measure each defense's cost."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources

import torch
import torch.nn.functional as F

from lambdasplit import defaults
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import LocalBody, load_local_body
from lambdasplit.errors import LambdaSplitError
from lambdasplit.privacy.attacks import Attacker
from lambdasplit.privacy.capture import observe, positions
from lambdasplit.privacy.defenses import GaussianNoise, random_split_point
from lambdasplit.privacy.inversion import InversionConfig, LearnedInverter
from lambdasplit.privacy.metrics import pii_recovered, rouge_l, token_accuracy
from lambdasplit.split.load import open_source
from lambdasplit.wire.codec import Codec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Defense:
    name: str
    codec: Codec = Codec.FP32
    noise: tuple[float, str] | None = None  # (sigma relative to RMS, where)
    random_split: bool = False
    tls: bool = False


DEFENSES = {
    "none": Defense("none"),
    "tls": Defense("tls", tls=True),
    "random-split": Defense("random-split", random_split=True),
    "int8": Defense("int8", codec=Codec.INT8),
    "noise-0.1": Defense("noise-0.1", noise=(0.1, "all")),
    "noise-0.3": Defense("noise-0.3", noise=(0.3, "all")),
    "noise-1.0": Defense("noise-1.0", noise=(1.0, "all")),
    "noise-1.0-prompt": Defense("noise-1.0-prompt", noise=(1.0, "prompt")),
}
ATTACKS = defaults.AUDIT_ATTACKS
PROBE_KS = [1, 2, 4, 8]


@dataclass
class Sample:
    prompt: str
    pii: list[str]


def load_prompts(limit: int | None = None) -> list[Sample]:
    text = resources.files("lambdasplit.privacy").joinpath("data/prompts.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Sample(r["prompt"], r["pii"]) for r in rows][:limit]


def heldout_text() -> str:
    return resources.files("lambdasplit.privacy").joinpath("data/heldout.txt").read_text()


@dataclass
class AuditConfig:
    source: str | None = None
    splits: list[tuple[int, int]] = field(default_factory=lambda: list(defaults.AUDIT_SPLITS))
    defenses: list[str] = field(default_factory=lambda: list(DEFENSES))
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    prompts: int | None = None
    max_new_tokens: int = defaults.AUDIT_MAX_NEW_TOKENS
    budget: int = 512  # candidate tokens per position the matcher may try
    inversion_steps: int = defaults.INVERSION_STEPS
    seed: int = 0

    @classmethod
    def from_options(
        cls, source: str | None, splits: list[tuple[int, int]] | None, attacks: list[str], defenses: list[str] | None,
        prompts: int | None, max_new_tokens: int, inversion_steps: int, quick: bool = False,
    ) -> AuditConfig:
        """`lambdasplit audit`'s settings. `quick` is the reduced audit (about 10 minutes on a laptop
        CPU, against hours): 3 prompts, splits 1,1 and 4,4, four defenses, shorter answers and
        inverter training; given splits, defenses and prompts still win. Unknown names are refused."""
        config = cls(source=source, max_new_tokens=max_new_tokens, prompts=prompts, inversion_steps=inversion_steps,
                     attacks=attacks)
        if quick:
            config.splits, config.prompts, config.max_new_tokens = [(1, 1), (4, 4)], prompts or 3, 12
            config.inversion_steps = min(inversion_steps, 100)
            config.defenses = ["none", "tls", "int8", "noise-1.0"]
        if splits:
            config.splits = splits
        if defenses is not None:
            config.defenses = defenses
        unknown = [d for d in config.defenses if d not in DEFENSES] + [a for a in config.attacks if a not in ATTACKS]
        if unknown:
            raise LambdaSplitError(f"unknown defense or attack: {', '.join(unknown)}")
        return config


def public_corpus(tokenizer) -> list[int]:
    """What the attacker trains on: the held-out public text, raw and wrapped in the chat template
    (never the audited prompts)."""
    lines = [line for line in heldout_text().splitlines() if line.strip()]
    ids = tokenizer(heldout_text())["input_ids"]
    if tokenizer.chat_template:
        for line in lines:
            chat = tokenizer.apply_chat_template([{"role": "user", "content": line}], add_generation_prompt=True, tokenize=False)
            ids += tokenizer(chat, add_special_tokens=False)["input_ids"]
    return ids


class AuditProgress:
    """Work units of an audit, reported as `callback(label, done, total)` before and after each unit.

    A unit is one generation (a reference answer, or a captured run attacked under both threat models),
    one quality pass per defense, or one inverter training. The total is known up front except for the
    inverters: the eavesdropper's probed K and a random split's K can need one more, and the total
    grows when they do, so the bar never reaches its end before the work does."""

    def __init__(self, config: AuditConfig, samples: int, callback: Callable[[str, int, int], None]) -> None:
        self.callback, self.done = callback, 0
        per_split = samples + len(config.defenses) * (1 + samples)
        inverters = len({k for k, _ in config.splits}) if "learned-inversion" in config.attacks else 0
        self.total = len(config.splits) * per_split + inverters
        self._planned_inverters = {k for k, _ in config.splits} if inverters else set()

    def inverter_needed(self, k: int) -> None:
        if k not in self._planned_inverters:
            self._planned_inverters.add(k)
            self.total += 1

    @contextmanager
    def unit(self, label: str):
        self.callback(label, self.done, self.total)
        yield
        self.done += 1
        self.callback(label, self.done, self.total)


def audit_units(config: AuditConfig) -> int:
    """The number of work units an audit starts with (see AuditProgress)."""
    return AuditProgress(config, len(load_prompts(config.prompts)), lambda *_: None).total


def run_audit(config: AuditConfig, progress: Callable[[str, int, int], None] = lambda *_: None) -> dict:
    samples = load_prompts(config.prompts)
    units = AuditProgress(config, len(samples), progress)
    rows, quality = [], []
    attacker = Attacker(open_source(config.source, None, allow_shallow=True), budget=config.budget)
    runtimes: dict[tuple[int, int], SplitRuntime] = {}
    inverters: dict[int, LearnedInverter] = {}

    def inverter_for(k: int) -> LearnedInverter:
        if k not in inverters:
            units.inverter_needed(k)
            with units.unit(f"training the inverter for K={k} ({config.inversion_steps} steps)"):
                corpus = public_corpus(runtime_for(*config.splits[0]).tokenizer)
                inverters[k] = LearnedInverter(attacker.opened, k, InversionConfig(steps=config.inversion_steps, seed=config.seed)).fit(corpus)
        return inverters[k]

    def runtime_for(k: int, m: int) -> SplitRuntime:
        if (k, m) not in runtimes:
            runtimes[(k, m)] = SplitRuntime.load(config.source, (k, m))
        return runtimes[(k, m)]

    for k, m in config.splits:
        runtime = runtime_for(k, m)
        reference = _reference(runtime, config, samples, units)
        for name in config.defenses:
            defense = DEFENSES[name]
            with units.unit(f"split {k},{m}  defense {name}: quality"):
                quality.append({"split": [k, m], "defense": name, **_quality(config, defense, k, m)})
            for i, (sample, ref) in enumerate(zip(samples, reference, strict=False)):
                session_k = random_split_point(1, 8) if defense.random_split else k
                with units.unit(f"split {k},{m}  defense {name}: prompt {i + 1}/{len(samples)}"):
                    captured, prompt_ids, gen_ids, _ = _run(runtime_for(session_k, m), config, defense, sample)
                    seen = observe(captured)
                    for threat in ("cloud", "eavesdropper"):
                        row = _attack(attacker, config, threat, defense, session_k, m, seen, prompt_ids, gen_ids, sample, runtime)
                        row["inversion"] = _invert(inverter_for, config, threat, defense, row, seen, prompt_ids, sample, runtime)
                        rows.append({"split": [k, m], "session_k": session_k, "defense": name, "threat": threat, **row,
                                     "greedy_match": gen_ids == ref})
    return {"config": {**config.__dict__, "splits": [list(s) for s in config.splits]}, "attacks": rows,
            "quality": quality, "summary": summarize(rows, quality, config.attacks)}


def _reference(runtime: SplitRuntime, config: AuditConfig, samples: list[Sample], units: AuditProgress) -> list[list[int]]:
    body = load_local_body(config.source, (runtime.spec.k, runtime.spec.m))
    sampling = SamplingParams(max_new_tokens=config.max_new_tokens)
    out = []
    for i, sample in enumerate(samples):
        with units.unit(f"split {runtime.spec.k},{runtime.spec.m}: reference answer {i + 1}/{len(samples)}"):
            out.append(runtime.generate(body, sample.prompt, sampling).token_ids[0])
    return out


def _body(config: AuditConfig, defense: Defense, k: int, m: int) -> LocalBody:
    body = load_local_body(config.source, (k, m), codec=defense.codec)
    if defense.noise:
        body.uplink_defense = GaussianNoise(defense.noise[0], defense.noise[1], seed=config.seed)
    return body


def _run(runtime: SplitRuntime, config: AuditConfig, defense: Defense, sample: Sample):
    body = _body(config, defense, runtime.spec.k, runtime.spec.m)
    body.captured = []
    result = runtime.generate(body, sample.prompt, SamplingParams(max_new_tokens=config.max_new_tokens))
    return body.captured, result.prompt_token_ids[0], result.token_ids[0], result.text


def _attack(attacker, config, threat, defense, k, m, seen, prompt_ids, gen_ids, sample, runtime) -> dict:
    """Both sides of the text: the prompt from the uplink, the answer from both links."""
    if threat == "eavesdropper" and defense.tls:
        return {"k_used": None, "m_used": None, "prompt": _scores([], prompt_ids, "", sample.pii), "output": _scores([], gen_ids, "", sample.pii),
                "seconds": 0.0, "note": "TLS: the frames are ciphertext"}
    start = time.perf_counter()
    uplink = positions(seen.uplink)
    # The cloud knows K and M (it runs layers K..L-M); the eavesdropper must probe for them.
    probing = threat == "eavesdropper" and "split-probing" in config.attacks
    k_used = attacker.probe_split(uplink, PROBE_KS)[0] if probing else k
    prompt_rec, out_rec, sent_up = [], [], []
    if "vocab-matching" in config.attacks:
        recovered = attacker.match(k_used, uplink).token_ids
        prompt_rec = recovered[: len(prompt_ids)]
        sent_up = recovered[len(prompt_ids):]  # each decode frame carries the previous generated token
        out_rec = sent_up
    m_used = attacker.probe_tail(seen.downlink, sent_up, PROBE_KS) if probing and sent_up else m
    if "tail-replay" in config.attacks and seen.downlink:
        out_rec = attacker.replay(m_used, seen.downlink).token_ids  # frame i's argmax: generated token i
    seconds = time.perf_counter() - start
    tok = runtime.tokenizer
    return {
        "k_used": k_used,
        "m_used": m_used,
        "prompt": _scores(prompt_rec, prompt_ids, tok.decode(prompt_rec, skip_special_tokens=True), sample.pii),
        "output": _scores(out_rec, gen_ids, tok.decode(out_rec, skip_special_tokens=True),
                          [p for p in sample.pii if p in tok.decode(gen_ids, skip_special_tokens=True)]),
        "seconds": seconds,
    }


def _invert(inverter_for, config, threat, defense, row, seen, prompt_ids, sample, runtime) -> dict | None:
    """The learned inverter on the prompt's uplink states, at the K the attacker works with."""
    if "learned-inversion" not in config.attacks:
        return None
    if threat == "eavesdropper" and defense.tls:
        return {**_scores([], prompt_ids, "", sample.pii), "seconds": 0.0}
    inverter = inverter_for(row["k_used"])
    rec = inverter.recover(positions(seen.uplink)[: len(prompt_ids)])
    text = runtime.tokenizer.decode(rec.token_ids, skip_special_tokens=True)
    return {**_scores(rec.token_ids, prompt_ids, text, sample.pii), "seconds": rec.seconds,
            "train_seconds": inverter.train_seconds}


def _scores(recovered: list[int], truth: list[int], text: str, pii: list[str]) -> dict:
    return {
        "token_accuracy": token_accuracy(recovered, truth),
        "exact": recovered == truth,
        "rouge_l": rouge_l(recovered, truth),
        "pii": pii_recovered(text, pii) if pii else None,
    }


@torch.inference_mode()
def _quality(config: AuditConfig, defense: Defense, k: int, m: int) -> dict:
    """Teacher-forced on held-out text: next-token KL to the unsplit model and perplexity."""
    if defense.tls or defense.random_split:
        return {"kl": 0.0, "perplexity_delta": 0.0, "note": "exact: the split output is unchanged"}
    runtime = SplitRuntime.load(config.source, (k, m))
    # At most the model's window: past it the numbers say nothing (and the body refuses it).
    ids = runtime.tokenizer(heldout_text(), return_tensors="pt")["input_ids"][:, :min(512, runtime.max_context)]
    clean_body, body = load_local_body(config.source, (k, m)), _body(config, defense, k, m)

    def logits(b) -> torch.Tensor:
        runtime.head.reset(), runtime.tail.reset(), b.reset()
        return runtime.tail(b.forward(runtime.head(ids)), logits_to_keep=0)[0, :-1].float()

    clean, noisy = logits(clean_body), logits(body)
    target = ids[0, 1:]
    kl = F.kl_div(F.log_softmax(noisy, -1), F.log_softmax(clean, -1), log_target=True, reduction="batchmean")
    ppl = lambda lg: float(torch.exp(F.cross_entropy(lg, target)))  # noqa: E731
    return {"kl": float(kl), "perplexity": ppl(noisy), "perplexity_clean": ppl(clean), "perplexity_delta": ppl(noisy) - ppl(clean)}


def summarize(rows: list[dict], quality: list[dict], attacks: list[str] = ATTACKS) -> list[dict]:
    """Means per (split, defense, threat); None for the columns of attacks that were not run."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((tuple(row["split"]), row["defense"], row["threat"]), []).append(row)
    q = {(tuple(x["split"]), x["defense"]): x for x in quality}
    out = []
    for (split, defense, threat), items in groups.items():
        mean = lambda f, items=items: statistics.mean(f(r) for r in items)  # noqa: E731
        pii = [r["prompt"]["pii"] for r in items if r["prompt"]["pii"] is not None]
        out.append({
            "split": list(split), "defense": defense, "threat": threat, "prompts": len(items),
            "prompt_token_accuracy": mean(lambda r: r["prompt"]["token_accuracy"]),
            "prompt_exact": mean(lambda r: float(r["prompt"]["exact"])),
            "prompt_rouge_l": mean(lambda r: r["prompt"]["rouge_l"]),
            "prompt_pii_recovered": statistics.mean(pii) if pii else None,
            **_inversion_summary(items),
            "output_token_accuracy": mean(lambda r: r["output"]["token_accuracy"]),
            "output_exact": mean(lambda r: float(r["output"]["exact"])),
            "output_rouge_l": mean(lambda r: r["output"]["rouge_l"]),
            "attacker_seconds": mean(lambda r: r["seconds"]),
            "inversion_seconds": mean(lambda r: (r.get("inversion") or {}).get("seconds", 0.0)),
            "inversion_train_seconds": mean(lambda r: (r.get("inversion") or {}).get("train_seconds", 0.0)),
            "greedy_agreement": mean(lambda r: float(r["greedy_match"])),
            "next_token_kl": q[(split, defense)].get("kl"),
            "perplexity_delta": q[(split, defense)].get("perplexity_delta"),
        })
    unused = []
    if "vocab-matching" not in attacks:
        unused += ["prompt_token_accuracy", "prompt_exact", "prompt_rouge_l", "prompt_pii_recovered"]
    if "vocab-matching" not in attacks and "tail-replay" not in attacks:
        unused += ["output_token_accuracy", "output_exact", "output_rouge_l", "attacker_seconds"]
    for row in out:
        row.update(dict.fromkeys(unused))
    return out


def _inversion_summary(items: list[dict]) -> dict:
    inv = [r["inversion"] for r in items if r.get("inversion")]
    if not inv:
        return {"inversion_token_accuracy": None, "inversion_pii_recovered": None}
    pii = [x["pii"] for x in inv if x["pii"] is not None]
    return {"inversion_token_accuracy": statistics.mean(x["token_accuracy"] for x in inv),
            "inversion_pii_recovered": statistics.mean(pii) if pii else None}
