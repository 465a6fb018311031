"""audit: what a curious cloud or an eavesdropper recovers, per defense."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lambdasplit import defaults
from lambdasplit.commands.options import (
    MaxNewTokensOpt,
    ModelOpt,
    names,
    progress_bar,
    split_type,
)
from lambdasplit.errors import LambdaSplitError
from lambdasplit.split.spec import SplitChoice


def audit(
    model: ModelOpt = None,
    split: Annotated[Optional[list[SplitChoice]], typer.Option(
        "--split", parser=split_type(ranged=False), metavar="<K,M>",
        help="K,M to audit (repeatable); default " + " ".join(f"{k},{m}" for k, m in defaults.AUDIT_SPLITS) + ".",
    )] = None,
    attacks: Annotated[str, typer.Option(help="Comma-separated: " + ", ".join(defaults.AUDIT_ATTACKS) + ".")] = ",".join(defaults.AUDIT_ATTACKS),
    defenses: Annotated[str, typer.Option(help="Comma-separated: none, tls, random-split, int8, noise-0.1, noise-0.3, noise-1.0, noise-1.0-prompt.")] = "all",
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.md, report.json, pareto.png.")] = Path(defaults.AUDIT_OUT),
    prompts: Annotated[Optional[int], typer.Option(help="Use only the first N prompts of the set.")] = None,
    max_new_tokens: MaxNewTokensOpt = defaults.AUDIT_MAX_NEW_TOKENS,
    inversion_steps: Annotated[int, typer.Option(help="Training steps of the learned inverter per K.")] = defaults.INVERSION_STEPS,
    pipeline: Annotated[Optional[str], typer.Option("--pipeline", help="Audit a split diffusion pipeline instead (a directory, tiny-sdxl or tiny-sd): image leakage per mode and K.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps of the audited image (with --pipeline).")] = defaults.IMAGE_STEPS,
    quick: Annotated[bool, typer.Option(help="Reduced audit: 3 prompts, splits 1,1 and 4,4, four defenses; about 10 minutes on a laptop CPU (the full audit takes hours).")] = False,
    identifiers: Annotated[bool, typer.Option("--identifiers", help="Audit pseudonymisation and decoy rows instead, on the held-out identifier set (one split: the first --split, default {},{}).".format(*defaults.SPLIT))] = False,
    identifier_set: Annotated[str, typer.Option("--identifier-set", help="With --identifiers: heldout or tune.")] = defaults.PII_PROMPT_SET,
    decoys: Annotated[str, typer.Option("--decoys", help="With --identifiers: decoy counts N to measure, comma-separated.")] = ",".join(map(str, defaults.PII_DECOYS)),
    attack_prompts: Annotated[int, typer.Option("--attack-prompts", help="With --identifiers: prompts whose captured frames are attacked.")] = defaults.PII_ATTACK_PROMPTS,
) -> None:
    """Measure what a curious cloud or an eavesdropper recovers from the hidden states, per defense."""
    command = "lambdasplit " + " ".join(sys.argv[1:])
    if pipeline is not None:
        from rich.progress import Progress

        from lambdasplit.privacy.diffusion import audit_pipeline

        with Progress() as progress:
            task = progress.add_task("auditing", total=None)
            audit_pipeline(pipeline, defaults.AUDIT_IMAGE_PROMPT, steps, out, lambda label: progress.update(task, description=label))
        typer.echo(f"wrote {out / 'diffusion.md'}, {out / 'diffusion.json'}")
        return
    if identifiers:
        from lambdasplit.privacy.pii_audit import PiiAuditConfig, run_pii_audit
        from lambdasplit.privacy.report import write_pii_report

        try:
            counts = tuple(int(n) for n in names(decoys))
        except ValueError:
            raise LambdaSplitError(f"--decoys {decoys!r}: expected whole numbers, comma-separated, e.g. 1,3,7") from None
        pii_config = PiiAuditConfig(source=model, split=split[0].point if split else defaults.SPLIT, prompt_set=identifier_set,
                                    prompts=prompts, attack_prompts=attack_prompts, decoys=counts, max_new_tokens=max_new_tokens)
        with progress_bar("auditing identifiers") as report:
            result = run_pii_audit(pii_config, report)
        paths = write_pii_report(result, out, command)
    else:
        from lambdasplit.privacy.audit import AuditConfig, run_audit
        from lambdasplit.privacy.report import write_report

        config = AuditConfig.from_options(model, [s.point for s in split or ()], names(attacks),
                                          None if defenses == "all" else names(defenses), prompts, max_new_tokens,
                                          inversion_steps, quick)
        # Units: each generation (reference or attacked run), quality pass and inverter training;
        # the audit reports done/total itself, the total growing if the attacks need another inverter.
        with progress_bar("auditing") as report:
            result = run_audit(config, progress=report)
        paths = write_report(result, out, command)
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")
