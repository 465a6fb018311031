"""Learned inversion: a small decoder trained to map layer-K states back to tokens.

Unlike vocabulary matching it needs no search and no exact head at attack time: it is trained once
on (layer-K state, token) pairs from public text, with Gaussian noise added to the states so that
it also reads noisy frames. It scores its output against the public embedding table (frozen), so
it names tokens it never saw in training and stays small (two D x 2D layers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lambdasplit.privacy.attacks import Recovery, _runner
from lambdasplit.split.load import OpenedSource
from lambdasplit.split.spec import SplitSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InversionConfig:
    steps: int = 300
    batch: int = 16  # sequences per step
    seq_len: int = 32
    lr: float = 3e-3
    noise: tuple[float, ...] = (0.0, 0.0, 0.1, 0.3, 1.0)  # sigma (x RMS) drawn per sequence
    random_fraction: float = 0.5  # share of sequences made of uniformly random tokens (vocabulary coverage)
    seed: int = 0


class _Decoder(nn.Module):
    def __init__(self, embedding: torch.Tensor) -> None:
        super().__init__()
        dim = embedding.shape[1]
        self.norm = nn.LayerNorm(dim)
        width = 4 * dim
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim))
        self.register_buffer("table", nn.functional.normalize(embedding.float(), dim=-1))
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        x = self.norm(states.float())
        x = nn.functional.normalize(x + self.mlp(x), dim=-1)
        return self.scale * x @ self.table.T


class LearnedInverter:
    """Trains on public text with the public head (the attacker's own copy), then inverts states."""

    def __init__(self, opened: OpenedSource, k: int, config: InversionConfig = InversionConfig()) -> None:
        layers = opened.config.num_hidden_layers
        self.k, self.config = k, config
        self.head = _runner(opened, SplitSpec(k, 0, layers), "head")
        embedding = self.head.module.embed_tokens.weight.detach()
        self.vocab = embedding.shape[0]
        self.decoder = _Decoder(embedding)
        self.train_seconds = 0.0
        self.train_accuracy = 0.0

    def fit(self, public_ids: list[int], progress: Callable[[int], None] = lambda _: None) -> LearnedInverter:
        """`public_ids`: token ids of public text (any text the attacker has, never the victim's)."""
        cfg = self.config
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        text = torch.tensor(public_ids, dtype=torch.long)
        optimizer = torch.optim.AdamW(self.decoder.parameters(), lr=cfg.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
        correct = total = 0
        for step in range(cfg.steps):
            ids = self._batch(text, gen)
            states = self._states(ids).clone()  # a normal tensor, so the decoder can train on it
            sigma = torch.tensor(cfg.noise)[torch.randint(len(cfg.noise), (ids.shape[0], 1, 1), generator=gen)]
            rms = states.pow(2).mean(-1, keepdim=True).sqrt()
            states = states + torch.randn(states.shape, generator=gen) * sigma * rms
            logits = self.decoder(states)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step >= cfg.steps - 20:  # training accuracy over the last steps, for the report
                correct += int((logits.argmax(-1) == ids).sum())
                total += ids.numel()
            progress(step)
        self.train_accuracy = correct / max(total, 1)
        self.train_seconds = time.perf_counter() - start
        log.info("inverter K=%d trained in %.1fs (train accuracy %.3f)", self.k, self.train_seconds, self.train_accuracy)
        return self

    @torch.no_grad()
    def recover(self, states: torch.Tensor) -> Recovery:
        """`states`: (T, D) observed layer-K states of one sequence."""
        start = time.perf_counter()
        ids = self.decoder(states.float()).argmax(-1).tolist()
        return Recovery(ids, seconds=time.perf_counter() - start)

    def _batch(self, text: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        rows = []
        for _ in range(cfg.batch):
            if torch.rand((), generator=gen) < cfg.random_fraction or text.numel() <= cfg.seq_len:
                rows.append(torch.randint(self.vocab, (cfg.seq_len,), generator=gen))
            else:
                at = int(torch.randint(text.numel() - cfg.seq_len, (), generator=gen))
                rows.append(text[at : at + cfg.seq_len])
        return torch.stack(rows)

    @torch.inference_mode()
    def _states(self, ids: torch.Tensor) -> torch.Tensor:
        self.head.reset()
        out = self.head(ids).float()
        self.head.reset()
        return out
