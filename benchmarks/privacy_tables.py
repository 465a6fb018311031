"""The tables of docs/privacy.md, rendered from the audits' report.json files (docs/audit/*/) and,
for the detector's recall, from the held-out requests themselves.

Each table sits between `<!-- generated: NAME ... -->` and `<!-- generated:end -->`; `python -m
benchmarks report` rewrites them and tests/test_docs.py checks that the page equals what this module
renders, so a number in a table is always the one in the committed report. Prose around the tables
is written by hand and may quote them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs"
PAGE = DOCS / "privacy.md"
AUDIT = DOCS / "audit"
MARKER = "<!-- generated:"
# A section's table may not contain a marker: with an end marker missing, the match would otherwise run
# on to the next section's end, and rendering would delete that section and the prose before it.
SECTION = re.compile(r"(?P<open><!-- generated: (?P<name>[\w-]+) [^\n]*?-->\n)(?:(?!<!-- generated:).)*?"
                     r"(?P<close><!-- generated:end -->)", re.S)


def _report(name: str) -> dict:
    return json.loads((AUDIT / name / "report.json").read_text())


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _ordered(values: list) -> list:
    """Distinct values in their first order of appearance."""
    return list(dict.fromkeys(values))


def _lookup(summary: list[dict]) -> dict[tuple[tuple[int, int], str, str], dict]:
    return {(tuple(s["split"]), s["defense"], s["threat"]): s for s in summary}


def _grid(report: str, threat: str, what: str, cell: Callable[[dict], str], label: Callable[[tuple[int, int]], str]) -> str:
    """Defenses down, splits across: one cell per (defense, split) of `threat`."""
    summary = _report(report)["summary"]
    rows, splits = _lookup(summary), _ordered([tuple(s["split"]) for s in summary])
    defenses = _ordered([s["defense"] for s in summary])
    return _table(["defense", *(f"{label(k)}{what}" for k in splits)],
                  [[d, *(cell(rows[(k, d, threat)]) for k in splits)] for d in defenses])


def _same_k_and_m(split: tuple[int, int]) -> str:
    return f"K=M={split[0]}" if split[0] == split[1] else f"K,M={split[0]},{split[1]}"


def _recovery(s: dict) -> str:
    return f"{_f(s['prompt_token_accuracy'])} / {_f(s['prompt_pii_recovered'])} / {_f(s['output_token_accuracy'])}"


def _quality(s: dict) -> str:
    return f"{_f(s['next_token_kl'])} / {_f(s['perplexity_delta'])} / {_f(s['greedy_agreement'])} / {_f(s['attacker_seconds'])}"


def _inversion(s: dict) -> str:
    return f"{_f(s['inversion_token_accuracy'])} / {_f(s['inversion_pii_recovered'])}"


def smollm2_threat(threat: str) -> str:
    return _grid("smollm2", threat, ": prompt acc / PII / output acc", _recovery, _same_k_and_m)


def smollm2_quality() -> str:
    """Quality is the device's (the same for both threats); attacker seconds are the cloud's."""
    return _grid("smollm2", "cloud", ": KL / ppl delta / greedy agreement / attacker s", _quality, _same_k_and_m)


def inversion(report: str, what: str = "") -> str:
    return _grid(report, "cloud", what, _inversion, lambda split: f"K={split[0]}")


def uneven() -> str:
    """K != M, no defense: prompt and output side per split, attacker time for both threats."""
    summary = _report("smollm2-uneven")["summary"]
    rows = _lookup(summary)
    out = []
    for split in _ordered([tuple(s["split"]) for s in summary]):
        cloud, tap = rows[(split, "none", "cloud")], rows[(split, "none", "eavesdropper")]
        prompt = f"{_f(cloud['prompt_token_accuracy'])} / {_f(cloud['prompt_pii_recovered'])}"
        if (tap["prompt_token_accuracy"], tap["prompt_pii_recovered"]) != (cloud["prompt_token_accuracy"], cloud["prompt_pii_recovered"]):
            prompt += f" (eavesdropper {_f(tap['prompt_token_accuracy'])} / {_f(tap['prompt_pii_recovered'])})"
        out.append([f"{split[0]},{split[1]}", prompt, _f(cloud["output_token_accuracy"]),
                    f"{_f(cloud['attacker_seconds'], 1)} / {_f(tap['attacker_seconds'], 1)}"])
    header = ["split K,M", "prompt tokens / PII (cloud = eavesdropper unless noted)", "generated tokens",
              "attacker s per prompt (cloud / eavesdropper)"]
    return _table(header, out)


GEMMA_ROWS = (("cloud", "none"), ("eavesdropper", "none"), ("cloud", "int8"), ("cloud", "noise-1.0"), ("eavesdropper", "tls"))


def gemma3() -> str:
    """The rows of the Gemma 3 audit the page discusses (GEMMA_ROWS)."""
    summary = _report("gemma3-270m")["summary"]
    rows, splits = _lookup(summary), _ordered([tuple(s["split"]) for s in summary])
    return _table(["threat, defense", *map(_same_k_and_m, splits)],
                  [[f"{t}, {d}", *(_recovery(rows[(k, d, t)]) for k in splits)] for t, d in GEMMA_ROWS])


def identifier_recall() -> str:
    """The detector's recall on the held-out requests, measured now (seconds): the set grew after the
    audit's report.json was written, and tests/test_pseudonym.py checks the table against the same call."""
    from lambdasplit.privacy.pii_audit import detector_recall, load_pii_prompts
    from lambdasplit.privacy.pseudonym import Detector

    recall = detector_recall(load_pii_prompts("heldout"), Detector())
    kinds = list(recall["per_kind"])
    return _table(["kind", *kinds, "all"],
                  [["planted", *(str(recall["per_kind"][k]["planted"]) for k in kinds), str(recall["planted"])],
                   ["recall", *(_f(recall["per_kind"][k]["recall"]) for k in kinds), _f(recall["overall"])]])


MODES = {"none": "none", "pseudonymize": "pseudonymisation", "decoys": "decoys alone",
         "pseudonymize+decoys": "pseudonymisation + decoys"}


def identifier_attack() -> str:
    summary = _report("smollm2-identifiers")["attack_summary"]
    return _table(["defense", "real identifiers recovered verbatim", "stand-ins recovered verbatim"],
                  [[MODES[mode], _f(v["real_recovered"]), _f(v["stand_ins_recovered"])] for mode, v in summary.items()])


def identifier_quality() -> str:
    q = _report("smollm2-identifiers")["quality_summary"]
    return _table(["", "share"], [["restored answer identical", _f(q["equal"])],
                                  ["differs, and the unprotected answer reproduces an identifier or a part of it",
                                   _f(q["identifier_dependent"])],
                                  ["differs otherwise", _f(q["differs_otherwise"])]])


def identifier_decoys() -> str:
    summary = _report("smollm2-identifiers")["decoy_summary"]
    names = [k.removesuffix("_row") for k in summary[0] if k.endswith("_row")]
    return _table(["defense", "N", "chance", *names],
                  [[MODES[s["mode"]], str(s["n"]), _f(s["chance"]),
                    *(f"{_f(s[f'{n}_row'])} / {_f(s[f'{n}_identifiers'])}" for n in names)] for s in summary])


def identifier_cost() -> str:
    cost = _report("smollm2-identifiers")["cost"]
    return _table(["N", "rows", "bytes up / forward", "bytes down / forward", "decode s / token", "vs N = 0"],
                  [[str(c["n"]), str(c["rows"]), f"{c['bytes_to_cloud_per_token']:,.0f}", f"{c['bytes_from_cloud_per_token']:,.0f}",
                    _f(c["decode_seconds_per_token"], 3), _f(c["time_vs_n0"])] for c in cost])


TABLES: dict[str, Callable[[], str]] = {
    "smollm2-cloud": lambda: smollm2_threat("cloud"),
    "smollm2-eavesdropper": lambda: smollm2_threat("eavesdropper"),
    "smollm2-quality": smollm2_quality,
    "smollm2-inversion": lambda: inversion("smollm2-inversion"),
    "smollm2-uneven": uneven,
    "gemma3-270m": gemma3,
    "gemma3-270m-inversion": lambda: inversion("gemma3-270m-inversion", ": prompt tokens / PII"),
    "identifiers-recall": identifier_recall,
    "identifiers-attack": identifier_attack,
    "identifiers-quality": identifier_quality,
    "identifiers-decoys": identifier_decoys,
    "identifiers-cost": identifier_cost,
}


def render(text: str) -> str:
    """`text` with every generated section replaced by its table; an unknown name, or a marker that is
    not part of a whole section, is an error."""
    sections = list(SECTION.finditer(text))
    paired = {m.start(part) for m in sections for part in ("open", "close")}
    stray = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(MARKER, text) if m.start() not in paired]
    if stray:
        raise ValueError(f"docs/privacy.md: a generated-section marker without its pair on line(s) {stray}")

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"docs/privacy.md names a generated table {name!r}; known: {', '.join(TABLES)}")
        return match["open"] + TABLES[name]() + "\n" + match["close"]

    return SECTION.sub(fill, text)


def write_privacy_tables() -> Path:
    PAGE.write_text(render(PAGE.read_text()))
    return PAGE
