"""SplitSpec: where a model with L decoder layers is cut into head, body and tail."""

from __future__ import annotations

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


def parse_split(text: str) -> tuple[int, int]:
    """Parse 'K,M' from the command line."""
    parts = text.replace(" ", "").split(",")
    if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
        raise SplitError(f"--split {text!r}: expected two integers 'K,M', e.g. --split 2,2")
    return int(parts[0]), int(parts[1])


def parse_split_range(text: str) -> tuple[int, int, int]:
    """Parse 'K,M' or 'KMIN-KMAX,M' (a randomised split: the device draws K per session)."""
    head, _, tail = text.replace(" ", "").partition(",")
    low, dash, high = head.partition("-")
    if not dash:
        k, m = parse_split(text)
        return k, k, m
    k_min, m = parse_split(f"{low},{tail}")
    k_max, _ = parse_split(f"{high},{tail}")
    if k_max <= k_min:
        raise SplitError(f"--split {text!r}: the K range must rise, e.g. 1-4,2")
    return k_min, k_max, m
