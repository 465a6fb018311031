"""Attacks that measure how much of the text an observer recovers from hidden states.

They need only what a curious cloud or an eavesdropper has: the public weights and the frames.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from lambdasplit.split.load import OpenedSource, part_runner
from lambdasplit.split.parts import PartRunner, cache_kwarg
from lambdasplit.split.spec import SplitSpec


@dataclass
class Recovery:
    token_ids: list[int]
    errors: list[float] = field(default_factory=list)  # relative distance of the best match per position
    seconds: float = 0.0
    evaluated: int = 0  # candidate tokens run through the head


def _runner(opened: OpenedSource, spec: SplitSpec, role: str) -> PartRunner:
    view = OpenedSource(opened.checkpoint, spec, None)
    return part_runner(view, role, torch.float32)


class VocabularyMatcher:
    """Input side: recover tokens one position at a time by running the public head on candidate
    tokens (batched, on a copy of the recovered prefix's KV cache) and keeping the candidate whose
    layer-K state is nearest the observed one.

    Candidates are tried in order of cosine similarity between the observed state and each token's
    context-free layer-K state (the head run on that token alone, computed once per K). That order
    puts the true token within the first few hundred for small K (measured on SmolLM2: worst rank 9
    at K = 1, 601 at K = 4), so an exact match usually needs one or a few batches, not the vocabulary.
    """

    def __init__(
        self, opened: OpenedSource, k: int, chunk: int = 128, budget: int = 4096, tol: float = 1e-3, patience: int = 8
    ) -> None:
        layers = opened.config.num_hidden_layers
        self.k = k
        self.head = _runner(opened, SplitSpec(k, 0, layers), "head")
        self.chunk, self.budget, self.tol, self.patience = chunk, budget, tol, patience
        start = time.perf_counter()
        self.ranker = torch.nn.functional.normalize(self._context_free_states(), dim=-1)
        self.setup_seconds = time.perf_counter() - start

    @torch.inference_mode()
    def _context_free_states(self, batch: int = 4096) -> torch.Tensor:
        vocab = self.head.module.embed_tokens.weight.shape[0]
        return torch.cat([self._candidates(torch.arange(s, min(s + batch, vocab)), 0) for s in range(0, vocab, batch)])

    @torch.inference_mode()
    def recover(self, states: torch.Tensor) -> Recovery:
        """`states`: (T, D) observed layer-K states of one sequence."""
        start = time.perf_counter()
        self.head.reset()
        result = Recovery([])
        for t in range(states.shape[0]):
            target = states[t].float()
            order = torch.argsort(self.ranker @ torch.nn.functional.normalize(target, dim=0), descending=True)
            best_id, best_err, stale = -1, float("inf"), 0
            for offset in range(0, min(self.budget, order.numel()), self.chunk):
                candidates = order[offset : offset + self.chunk]
                outs = self._candidates(candidates, t)
                errs = (outs - target).norm(dim=-1) / target.norm().clamp(min=1e-12)
                i = int(errs.argmin())
                result.evaluated += candidates.numel()
                if float(errs[i]) < best_err:
                    best_id, best_err, stale = int(candidates[i]), float(errs[i]), 0
                else:
                    stale += 1
                # An exact match ends the search; without one (noise, lossy codecs), stop once the
                # best candidate has not improved for `patience` batches.
                if best_err < self.tol or stale >= self.patience:
                    break
            result.token_ids.append(best_id)
            result.errors.append(best_err)
            self.head(torch.tensor([[best_id]]))  # extend the attacker's prefix cache
        result.seconds = time.perf_counter() - start
        return result

    def _candidates(self, ids: torch.Tensor, t: int) -> torch.Tensor:
        """Layer-K state of each candidate token at position t after the recovered prefix."""
        count = ids.numel()
        if self.k == 0:
            return self.head.module.embed_tokens(ids).float()
        kwargs = {"input_ids": ids[:, None], "position_ids": torch.full((count, 1), t)}
        if t:
            cache = copy.deepcopy(self.head.cache)
            cache.batch_repeat_interleave(count)
            kwargs[cache_kwarg(self.head.module)] = cache
            kwargs["attention_mask"] = torch.ones(count, t + 1, dtype=torch.long)
        return self.head.module(**kwargs, use_cache=bool(t)).last_hidden_state[:, -1].float()



class Attacker:
    """An observer holding the public weights; builds (and keeps) what each attack needs."""

    def __init__(self, opened: OpenedSource, budget: int = 4096) -> None:
        self.opened = opened
        self.budget = budget
        self._matchers: dict[int, VocabularyMatcher] = {}
        self._tails: dict[int, PartRunner] = {}

    def replay(self, m: int, downlink: list[torch.Tensor]) -> Recovery:
        """Output side: run the public tail (last M layers + norm + LM head) on the states the
        cloud returns; the argmax at each frame's last position is the token a greedy device chose."""
        start = time.perf_counter()
        if m not in self._tails:
            layers = self.opened.config.num_hidden_layers
            self._tails[m] = _runner(self.opened, SplitSpec(layers - m, m, layers), "tail")
        tail = self._tails[m]
        tail.reset()
        ids = [int(tail(frame[:1].float(), logits_to_keep=1)[0, -1].argmax()) for frame in downlink]
        return Recovery(ids, seconds=time.perf_counter() - start)

    def probe_tail(self, downlink: list[torch.Tensor], uplink_tokens: list[int], ms: list[int], frames: int = 4) -> int:
        """When M is unknown: the tail's prediction for frame i must equal the token the device sent
        up next (recovered by matching); keep the M with the most agreement."""
        def agreement(m: int) -> int:
            predicted = self.replay(m, downlink[:frames]).token_ids
            return sum(a == b for a, b in zip(predicted, uplink_tokens[:frames], strict=False))

        layers = self.opened.config.num_hidden_layers
        return max([m for m in ms if m <= layers], key=agreement)

    def matcher(self, k: int) -> VocabularyMatcher:
        if k not in self._matchers:
            self._matchers[k] = VocabularyMatcher(self.opened, k, budget=self.budget)
        return self._matchers[k]

    def match(self, k: int, states: torch.Tensor, budget: int | None = None) -> Recovery:
        matcher = self.matcher(k)
        matcher.budget = budget or self.budget
        return matcher.recover(states)

    def probe_split(self, states: torch.Tensor, ks: list[int], positions: int = 4) -> tuple[int, dict[int, float]]:
        """When K is unknown: match the first positions under each candidate K; keep the K whose
        matching error is lowest."""
        errors = {}
        layers = self.opened.config.num_hidden_layers
        for k in [k for k in ks if k <= layers]:
            rec = self.match(k, states[:positions], budget=self.matcher(k).chunk)
            errors[k] = sum(rec.errors) / len(rec.errors)
        return min(errors, key=errors.get), errors
