"""Write an audit's report.json, report.md and Pareto plot."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(result: dict, out: Path, command: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    plot = _pareto(result["summary"], out / "pareto.png")
    lines = [
        "# lambdasplit privacy audit", "",
        f"Reproduce: `{command}`", "",
        "Threat models: **cloud** = holds the body weights, knows K and M, sees every frame; "
        "**eavesdropper** = taps the network without TLS, knows the public model, must guess K and M "
        "(split-index probing). Attacks: vocabulary matching on the uplink (prompt and every generated "
        "token but the last), tail replay on the downlink (generated tokens), and a learned inverter "
        "(trained on public text with noise augmentation) on the prompt's uplink states.", "",
        "| split | defense | threat | prompt token acc | prompt exact | prompt PII | inverter token acc | "
        "inverter PII | output token acc | attacker s/prompt | greedy agreement | next-token KL | ppl delta |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    for s in result["summary"]:
        lines.append(
            f"| {s['split'][0]},{s['split'][1]} | {s['defense']} | {s['threat']} | {fmt(s['prompt_token_accuracy'])} | "
            f"{fmt(s['prompt_exact'])} | {fmt(s['prompt_pii_recovered'])} | {fmt(s.get('inversion_token_accuracy'))} | "
            f"{fmt(s.get('inversion_pii_recovered'))} | {fmt(s['output_token_accuracy'])} | "
            f"{fmt(s['attacker_seconds'])} | {fmt(s['greedy_agreement'])} | {fmt(s['next_token_kl'])} | "
            f"{fmt(s['perplexity_delta'])} |"
        )
    if plot:
        lines += ["", f"![recovery vs quality loss]({plot.name})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"json": out / "report.json", "md": out / "report.md", **({"plot": plot} if plot else {})}


def _pareto(summary: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    attacks = (("prompt_token_accuracy", "o", "vocabulary matching"), ("inversion_token_accuracy", "x", "learned inversion"))
    for key, marker, label in attacks:
        points = [s for s in summary if s["threat"] == "cloud" and s.get(key) is not None]
        if not points:
            continue
        xs = [s["next_token_kl"] or 0.0 for s in points]
        ax.scatter(xs, [s[key] for s in points], s=30, marker=marker, label=label)
        for s, x in zip(points, xs, strict=True):
            ax.annotate(f"{s['defense']} K={s['split'][0]}", (x, s[key]), fontsize=6)
    ax.legend(fontsize=8)
    ax.set_xlabel("quality loss: next-token KL to the unsplit model (held-out text)")
    ax.set_ylabel("curious cloud: prompt token recovery")
    ax.set_title("Defenses: recovery vs quality loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_pii_report(result: dict, out: Path, command: str) -> dict[str, Path]:
    """report.json and report.md of the identifier audit (privacy/pii_audit.py)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    fmt = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    recall, cfg = result["recall"], result["config"]
    lines = ["# lambdasplit identifier audit: pseudonymisation and decoy rows", "", f"Reproduce: `{command}`", "",
             f"Split K,M = {cfg['split'][0]},{cfg['split'][1]}; prompt set `{cfg['prompt_set']}`; {cfg['max_new_tokens']} greedy new tokens.", "",
             "## Detector recall (an identifier left in the sent text is a leak)", "",
             "| kind | planted | hidden | recall |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['planted']} | {v['hidden']} | {fmt(v['recall'])} |" for k, v in recall["per_kind"].items()]
    lines += [f"| all | {recall['planted']} | {sum(v['hidden'] for v in recall['per_kind'].values())} | {fmt(recall['overall'])} |", "",
              "Missed: " + ("; ".join(f"{m['kind']} `{m['text']}`" for m in recall["misses"]) or "none"), "",
              "## Curious cloud's vocabulary matching on the captured frames", "",
              "| defense | real identifiers recovered verbatim | stand-ins recovered verbatim |", "|---|---|---|"]
    for mode, v in result["attack_summary"].items():
        lines.append(f"| {mode} | {fmt(v['real_recovered'])} | {fmt(v['stand_ins_recovered'])} |")
    q = result["quality_summary"]
    checks = result["decoy_checks"]
    lines += ["", "## Quality (restored greedy answer vs the unprotected one)", "",
              f"{q['prompts']} prompts: equal {fmt(q['equal'])}; differing where the answer reproduces an identifier "
              f"{fmt(q['identifier_dependent'])}; differing otherwise {fmt(q['differs_otherwise'])}; mean character ROUGE-L of the "
              f"differing answers {fmt(q['rouge_l_of_differences'])}.", "",
              f"Decoys (N = 3): the real row's answer equals the undefended answer for {sum(c['equal'] for c in checks)} "
              f"of {len(checks)} prompts.", "",
              "## Decoys: attacker's success at naming the real row / the real identifiers", ""]
    summary = result["decoy_summary"]
    if summary:
        names = [k[: -len("_row")] for k in summary[0] if k.endswith("_row")]
        lines += ["| defense | N | chance | length matched | " + " | ".join(f"{n}: row / identifiers" for n in names) + " |",
                  "|---|---|---|---|" + "---|" * len(names)]
        for s in summary:
            cells = " | ".join(f"{fmt(s[f'{n}_row'])} / {fmt(s[f'{n}_identifiers'])}" for n in names)
            lines.append(f"| {s['mode']} | {s['n']} | {fmt(s['chance'])} | {fmt(s['length_matched'])} | {cells} |")
    lines += ["", "## Cost per generated token (this machine)", "",
              "| N | rows | bytes up / token | bytes down / token | decode s / token | vs N = 0 |", "|---|---|---|---|---|---|"]
    for c in result["cost"]:
        lines.append(f"| {c['n']} | {c['rows']} | {c['bytes_to_cloud_per_token']:.0f} | {c['bytes_from_cloud_per_token']:.0f} | "
                     f"{c['decode_seconds_per_token']:.4f} | {fmt(c['time_vs_n0'])} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"json": out / "report.json", "md": out / "report.md"}
