"""Distinguishers: how a curious cloud that inverted every row of a decoy batch picks the real one.

The cloud knows the decoy generator (it is open source), sees which spans differ between the rows (the
rest of the text is identical) and holds the public model. Each distinguisher scores every row; the
attacker names the highest. The audit compares their success with chance, 1/(N + 1).
"""

from __future__ import annotations

import re
from functools import cached_property

import torch
import torch.nn.functional as F

from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.privacy.pseudonym import _STREET_COMPOUND, Detector, _fold, name_lexicon

Values = list[list[tuple[str, str]]]  # per row: (kind, value) of each span
_MODELS: dict[str, torch.nn.Module] = {}
_LAST: dict = {}


class Distinguisher:
    name = "base"

    def __init__(self, runtime: SplitRuntime, detector: Detector) -> None:
        self.runtime, self.detector = runtime, detector

    def scores(self, texts: list[str], values: Values) -> list[float]:
        raise NotImplementedError


class _LanguageModel(Distinguisher):
    """The public model, unsplit (the cloud has every layer), for log-likelihoods of whole rows."""

    @cached_property
    def model(self):
        path = str(self.runtime.opened.checkpoint.path)
        if path not in _MODELS:
            from transformers import AutoModelForCausalLM

            _MODELS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return _MODELS[path]

    @torch.inference_mode()
    def token_logprobs(self, texts: list[str]) -> tuple[list[torch.Tensor], list[list[tuple[int, int]]]]:
        """Per row: log p(token_t | tokens before t) for t >= 1, and each token's character offsets (the last
        batch is remembered: every likelihood distinguisher scores the same rows)."""
        key = (str(self.runtime.opened.checkpoint.path), tuple(texts))
        if _LAST.get("key") != key:
            _LAST.update(key=key, value=self._token_logprobs(texts))
        return _LAST["value"]

    def _token_logprobs(self, texts: list[str]) -> tuple[list[torch.Tensor], list[list[tuple[int, int]]]]:
        tok = self.runtime.tokenizer
        enc = [tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
        out = []
        for e in enc:
            ids = torch.tensor([e["input_ids"]])
            logits = self.model(input_ids=ids).logits[0, :-1].float()
            out.append(F.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0])
        return out, [e["offset_mapping"][1:] for e in enc]


class LikelihoodDistinguisher(_LanguageModel):
    """The row the public model finds most likely: real text may read more naturally than a decoy's."""

    name = "lm"

    def scores(self, texts: list[str], values: Values) -> list[float]:
        logprobs, _ = self.token_logprobs(texts)
        return [float(lp.sum()) for lp in logprobs]


class SpanLikelihoodDistinguisher(_LanguageModel):
    """Likelihood of only the tokens inside the differing spans (the rest is shared by every row)."""

    name = "lm-span"

    def scores(self, texts: list[str], values: Values) -> list[float]:
        logprobs, offsets = self.token_logprobs(texts)
        out = []
        for text, lp, offs, row in zip(texts, logprobs, offsets, values, strict=True):
            ranges, at = [], 0
            for _, value in row:
                start = text.find(value, at)
                if start >= 0:
                    ranges.append((start, start + len(value)))
                    at = start + len(value)
            inside = [i for i, (a, b) in enumerate(offs) if any(a < e and b > s for s, e in ranges)]
            out.append(float(lp[inside].sum()) if inside else 0.0)
        return out


class GeneratorPriorDistinguisher(Distinguisher):
    """Frequency prior of the generator: a value the decoy generator could not have produced is real.

    Names come from Faker's lists and decoy e-mail domains from a fixed pattern, so a row whose name
    is not in those lists (or whose domain is gmail.com) stands out. The score is minus the number of
    values that look generated."""

    name = "prior"

    def __init__(self, runtime: SplitRuntime, detector: Detector) -> None:
        super().__init__(runtime, detector)
        lexicon = name_lexicon()
        self.names = set(lexicon.first) | set(lexicon.last)
        self.folded_last = {_fold(n) for n in lexicon.last}

    def looks_generated(self, kind: str, value: str) -> bool:
        if kind == "PERSON":
            return all(w in self.names or w.islower() for w in value.split())
        if kind == "EMAIL":
            domain = value.partition("@")[2]
            m = re.fullmatch(r"([a-z]+?)(mail|net|post|web)?\.(.+)", domain)
            return bool(m) and m.group(1) in self.folded_last
        if kind == "ADDRESS":
            words = [w for w in re.findall(r"[^\W\d_]+", value) if w[:1].isupper()]
            return any(re.sub(rf"{_STREET_COMPOUND}$", "", w) in self.names for w in words)
        return True  # format-preserving random digits: the generator can produce any value of the format

    def scores(self, texts: list[str], values: Values) -> list[float]:
        return [-float(sum(self.looks_generated(k, v) for k, v in row)) for row in values]


class CombinedDistinguisher(Distinguisher):
    """The prior first; among rows it cannot separate, the span likelihood."""

    name = "prior+lm-span"

    def __init__(self, runtime: SplitRuntime, detector: Detector) -> None:
        super().__init__(runtime, detector)
        self.prior = GeneratorPriorDistinguisher(runtime, detector)
        self.span = SpanLikelihoodDistinguisher(runtime, detector)

    def scores(self, texts: list[str], values: Values) -> list[float]:
        return [p * 1e6 + s for p, s in zip(self.prior.scores(texts, values), self.span.scores(texts, values), strict=True)]


DISTINGUISHERS: tuple[type[Distinguisher], ...] = (
    LikelihoodDistinguisher, SpanLikelihoodDistinguisher, GeneratorPriorDistinguisher, CombinedDistinguisher)
