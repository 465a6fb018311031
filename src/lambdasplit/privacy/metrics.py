"""How much was recovered: token accuracy, exact match, ROUGE-L, planted personal data."""

from __future__ import annotations


def token_accuracy(recovered: list[int], truth: list[int]) -> float:
    if not truth:
        return 1.0
    hits = sum(a == b for a, b in zip(recovered, truth, strict=False))
    return hits / len(truth)


def rouge_l(recovered: list[int], truth: list[int]) -> float:
    """ROUGE-L F1 over token ids (longest common subsequence)."""
    if not recovered or not truth:
        return 0.0
    prev = [0] * (len(truth) + 1)
    for a in recovered:
        row = [0]
        for j, b in enumerate(truth):
            row.append(prev[j] + 1 if a == b else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(recovered), lcs / len(truth)
    return 2 * precision * recall / (precision + recall)


def pii_recovered(text: str, pii: list[str]) -> float:
    """Fraction of planted personal-data strings that appear verbatim in the recovered text."""
    return sum(item in text for item in pii) / len(pii) if pii else 0.0
