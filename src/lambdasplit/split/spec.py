"""SplitSpec: where a model with L decoder layers is cut into head, body and tail."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lambdasplit.errors import SplitError

ROLES = ("head", "body", "tail")


@dataclass(frozen=True)
class SplitSpec:
    """head = embeddings + layers [0, K); body = [K, L-M); tail = [L-M, L) + final norm + LM head."""

    k: int
    m: int
    layers: int

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise SplitError(f"model has {self.layers} decoder layers; nothing to split")
        if self.k < 0 or self.m < 0:
            raise SplitError(f"split K={self.k}, M={self.m}: K and M must be >= 0")
        if self.k + self.m > self.layers:
            raise SplitError(
                f"split K={self.k}, M={self.m}: K + M = {self.k + self.m} exceeds the model's "
                f"{self.layers} decoder layers"
            )

    @classmethod
    def create(cls, k: int, m: int, layers: int, allow_shallow: bool = False) -> SplitSpec:
        """Validate a split, refusing the trivially invertible shallow edges unless asked for and
        always a body with no layers (the cloud would compute nothing; internal views such as an
        attack's tail-only runner build SplitSpec directly)."""
        spec = cls(k, m, layers)
        if k + m == layers:
            raise SplitError(
                f"split K={k}, M={m}: K + M = {layers} is every one of the model's {layers} decoder layers, "
                f"leaving the body (cloud) empty; choose K + M < {layers}"
            )
        if not allow_shallow and k == 0:
            raise SplitError(
                "K=0 sends raw token embeddings to the cloud, which map back to the prompt by a table "
                "lookup; choose K >= 1 or pass --allow-shallow"
            )
        if not allow_shallow and m == 0:
            raise SplitError(
                "M=0 returns the final hidden states, from which the cloud reads the generated tokens "
                "with the public LM head; choose M >= 1 or pass --allow-shallow"
            )
        return spec

    def range(self, role: str) -> tuple[int, int]:
        """Half-open range of decoder layers that `role` runs."""
        if role == "head":
            return (0, self.k)
        if role == "body":
            return (self.k, self.layers - self.m)
        if role == "tail":
            return (self.layers - self.m, self.layers)
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")

    def as_dict(self) -> dict[str, object]:
        return {
            "layers": self.layers,
            "head": list(self.range("head")),
            "body": list(self.range("body")),
            "tail": list(self.range("tail")),
        }


# The --split grammar, in one place: K,M or KMIN-KMAX,M with non-negative integers.
_SPLIT = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?,\s*(\d+)\s*$")


@dataclass(frozen=True)
class SplitChoice:
    """A --split as written: K,M, or KMIN-KMAX,M (a randomised split: the device draws K per
    session, the server hosts every body in the range). Whether K+M fits the model is checked
    later, by SplitSpec, once L is known."""

    k_min: int
    k_max: int
    m: int

    @classmethod
    def parse(cls, text: str, ranged: bool = True) -> SplitChoice:
        """`text` as K,M (or, where `ranged`, KMIN-KMAX,M); SplitError says what was expected."""
        match = _SPLIT.match(text)
        if match is None or (match[2] is not None and not ranged):
            expected = "K,M or KMIN-KMAX,M with non-negative integers, e.g. 2,2 or 1-4,2" if ranged else (
                "K,M with two non-negative integers, e.g. 2,2")
            raise SplitError(f"{text!r}: expected {expected}")
        k_min, m = int(match[1]), int(match[3])
        k_max = int(match[2]) if match[2] is not None else k_min
        if k_max <= k_min and match[2] is not None:
            raise SplitError(f"{text!r}: the K range must rise, e.g. 1-4,2")
        return cls(k_min, k_max, m)

    @property
    def point(self) -> tuple[int, int]:
        """(K, M) of a fixed split; of a range, its lowest K (the widest body, which the server loads)."""
        return self.k_min, self.m

    @property
    def ranged(self) -> bool:
        return self.k_max != self.k_min

    def __str__(self) -> str:
        return f"{self.k_min}-{self.k_max},{self.m}" if self.ranged else f"{self.k_min},{self.m}"

