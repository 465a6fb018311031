"""Every fenced block of README.md and docs/*.md is executed or checked, so the docs cannot drift
from the code.

How a block is classified (`classify`):
  python       info string `python`/`py`: run as a script in a subprocess (HF_HUB_OFFLINE=1).
  synopsis     a command block with `[--` (optional flags in brackets, placeholders): not runnable;
               every flag it lists must appear in that subcommand's `--help`.
  two-machine  a command block naming a host other than loopback (`*.example.org`, `0.0.0.0`): run
               on loopback instead (127.0.0.1, a generated token and certificates, free ports).
  commands     any other block with a line starting with a COMMAND_PREFIXES entry: each command
               (`&&` splits them) runs through RULES in a temporary directory; every line must be a
               comment or a command a rule knows, so a new kind of command fails here until it gets one.
  text         anything else (diagrams, frame listings): nothing to run.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lambdasplit.child import ChildProcess

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
LAMBDASPLIT = str(VENV_BIN / "lambdasplit")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "250"}

COMMAND_PREFIXES = ("lambdasplit ", ".venv/bin/", "./scripts/", "python -m ")
REMOTE_HOST = re.compile(r"\b(?:0\.0\.0\.0|[\w-]+\.example\.(?:org|com|net))\b")
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^\s*(`{3,}|~{3,})\s*(\S*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, lang, start = opening.group(1), opening.group(2).lower(), i
        i += 1
        block_lines = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            block_lines.append(lines[i])
            i += 1
        blocks.append(Block(path, start + 1, lang, "\n".join(block_lines)))
        i += 1
    return blocks


ALL_BLOCKS = [block for path in DOCS for block in fenced_blocks(path)]


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and comment-only lines dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line and not line.startswith("#"):
            out.append(line)
    return out


def is_command(line: str) -> bool:
    return line.startswith(COMMAND_PREFIXES)


def classify(block: Block) -> str:
    if block.lang in ("python", "py"):
        return "python"
    lines = logical_lines(block.text)
    if block.lang not in ("", "bash", "sh", "shell", "console") or not any(is_command(line) for line in lines):
        return "text"
    if "[--" in block.text:
        return "synopsis"
    if REMOTE_HOST.search(block.text):
        return "two-machine"
    return "commands"


def blocks_of(kind: str, slow=lambda block: False) -> list:
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if slow(b) else [])
            for b in ALL_BLOCKS if classify(b) == kind]


def commands(line: str) -> list[list[str]]:
    """A shell line split into simple commands at `&&` (comments dropped)."""
    groups: list[list[str]] = [[]]
    for token in shlex.split(line, comments=True):
        if token == "&&":
            groups.append([])
        else:
            groups[-1].append(token)
    return [g for g in groups if g]


def flags(tokens) -> set[str]:
    return {flag for token in tokens if token.startswith(("-", "[", "("))
            for flag in FLAG.findall(token.split("=", 1)[0])}


# --- --help of the CLIs ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def lambdasplit_help(subcommand: str) -> str:
    """`lambdasplit SUBCOMMAND --help`, in this process (each subprocess would import transformers)."""
    from typer.testing import CliRunner

    from lambdasplit.cli import app

    result = CliRunner().invoke(app, [subcommand, "--help"], env={"COLUMNS": "250"}, terminal_width=250)
    assert result.exit_code == 0, f"lambdasplit {subcommand} --help failed:\n{result.output}"
    return result.output


def help_flags(help_text: str) -> set[str]:
    return set(FLAG.findall(help_text))


def missing_flags(subcommand: str, used: set[str]) -> set[str]:
    return used - help_flags(lambdasplit_help(subcommand))


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- rules for command blocks ------------------------------------------------------------------

def _script(tokens: list[str], tmp: Path) -> str:
    """./scripts/venv.sh, ./scripts/browser.sh: syntax-checked always; run only where it is a no-op."""
    script = ROOT / tokens[0]
    assert script.is_file() and os.access(script, os.X_OK), f"{tokens[0]} is missing or not executable"
    run(["bash", "-n", str(script)], tmp)
    if script.name == "venv.sh":
        # The setup command installs torch & co. when its stamp is stale: run it only when it is up to
        # date (then it just checks the stamp), never a real install from a test.
        want = subprocess.run("cat pyproject.toml scripts/venv.sh | sha256sum | cut -d' ' -f1", shell=True,
                              cwd=ROOT, capture_output=True, text=True).stdout.strip()
        stamp = ROOT / ".venv" / ".lambdasplit-stamp"
        if stamp.is_file() and stamp.read_text().strip() == want:
            run([str(script), *tokens[1:]], tmp)
            return "ran (stamp up to date: no install)"
        return "syntax-checked only (stamp stale: running it would install packages)"
    if script.name == "browser.sh":
        # Installs chromium with apt when missing: run only when it would exit at once.
        if any(shutil.which(name) for name in ("chromium", "chromium-browser")):
            run([str(script), *tokens[1:]], tmp)
            return "ran (chromium present)"
        return "syntax-checked only (chromium missing: it would apt-get install)"
    if script.name == "haproxy.sh":
        # Installs haproxy with apt when missing (the load-balancer test): run only when it would exit at once.
        if shutil.which("haproxy") or os.access("/usr/sbin/haproxy", os.X_OK):
            run([str(script), *tokens[1:]], tmp)
            return "ran (haproxy present)"
        return "syntax-checked only (haproxy missing: it would apt-get install)"
    raise AssertionError(f"no rule for {tokens[0]}: add one to tests/test_docs.py")


def _python_module(tokens: list[str], tmp: Path) -> str:
    """`.venv/bin/python -m pytest ...` (the test command: the suite itself) and `python -m benchmarks
    ...` (minutes): run with --help, which still rejects an unknown option."""
    if len(tokens) >= 2 and tokens[1].startswith("scripts/") and tokens[1].endswith(".py"):
        # A script run for minutes (scripts/failover.py: 20 kill trials): --help, flags checked.
        out = run([PYTHON, str(ROOT / tokens[1]), "--help"], ROOT, timeout=120).stdout
        unknown = flags(tokens[2:]) - help_flags(out)
        assert not unknown, f"{shlex.join(tokens)}: not in `{tokens[1]} --help`: {sorted(unknown)}"
        return "script --help, flags checked"
    if tokens[1:2] != ["-m"] or len(tokens) < 3:
        raise AssertionError(f"no rule for {shlex.join(tokens)}: add one to tests/test_docs.py")
    module = tokens[2]
    if module == "pytest":
        run([PYTHON, "-m", "pytest", "--noconftest", *tokens[3:], "--help"], ROOT, timeout=120)
        return "pytest --help with the same options"
    if module == "benchmarks":
        subcommand = [t for t in tokens[3:] if not t.startswith("-")][:1]
        out = run([PYTHON, "-m", "benchmarks", *subcommand, "--help"], ROOT, timeout=120).stdout
        unknown = flags(tokens[3:]) - help_flags(out)
        where = shlex.join(["python", "-m", "benchmarks", *subcommand, "--help"])
        assert not unknown, f"{shlex.join(tokens)}: not in `{where}`: {sorted(unknown)}"
        return "benchmarks --help, flags checked"
    raise AssertionError(f"no rule for python -m {module}: add one to tests/test_docs.py")


# Cheap variants of long lambdasplit commands, appended to the documented command (for a repeated
# option the last value wins, so the documented flags are still parsed and validated).
REDUCED = {
    # The full audit takes about an hour; one split, one defense, one attack, one prompt: ~10 s.
    "audit": ["--split", "2,2", "--attacks", "tail-replay", "--defenses", "none", "--prompts", "1", "-n", "2",
              "--inversion-steps", "1"],
}


def _lambdasplit(tokens: list[str], tmp: Path) -> str:
    subcommand = tokens[1]
    unknown = missing_flags(subcommand, flags(tokens[2:]))
    assert not unknown, f"{shlex.join(tokens)}: not in `lambdasplit {subcommand} --help`: {sorted(unknown)}"
    if subcommand in ("serve", "gateway", "ui"):
        raise AssertionError(
            f"`lambdasplit {subcommand}` runs until stopped: give its block a rule in tests/test_docs.py"
        )
    run([LAMBDASPLIT, *tokens[1:], *REDUCED.get(subcommand, [])], tmp)  # relative --out lands in tmp
    return "ran" + (" (reduced)" if subcommand in REDUCED else "")


def run_command(tokens: list[str], tmp: Path) -> str:
    head = tokens[0].removeprefix(".venv/bin/")
    if head == "lambdasplit":
        return _lambdasplit(tokens, tmp)
    if head == "python":
        return _python_module(tokens, tmp)
    if tokens[0].startswith("./scripts/"):
        return _script(tokens, tmp)
    if head == "ruff":  # the lint step of the test command: seconds, so it runs as written
        run([str(ROOT / ".venv/bin/ruff"), *tokens[1:]], ROOT)
        return "ran"
    raise AssertionError(f"no rule for {shlex.join(tokens)}: add one to tests/test_docs.py")


# --- tests -------------------------------------------------------------------------------------

def test_every_block_is_recognised():
    kinds = {b.id: classify(b) for b in ALL_BLOCKS}
    readme = {kind for block_id, kind in kinds.items() if block_id.startswith("README.md")}
    # A parser that silently stopped finding blocks would make the other tests vacuous.
    assert {"python", "commands", "synopsis", "two-machine", "text"} <= readme, kinds
    for block in ALL_BLOCKS:
        if classify(block) == "commands":
            strays = [line for line in logical_lines(block.text) if not is_command(line)]
            assert not strays, f"{block.id}: lines that are neither comments nor known commands: {strays}"


@pytest.mark.parametrize("block", blocks_of("python"))
def test_python_block_runs(block, tmp_path):
    proc = subprocess.run([PYTHON, "-c", block.text], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("block", blocks_of("synopsis"))
def test_synopsis_flags_exist_in_help(block):
    entries: list[list[str]] = []
    for raw in block.text.splitlines():
        tokens = shlex.split(raw, comments=True)
        if not tokens:
            continue
        if tokens[0] == "lambdasplit":
            entries.append(tokens)
        else:
            assert entries and raw[:1].isspace(), f"{block.id}: stray synopsis line {raw!r}"
            entries[-1].extend(tokens)
    problems = []
    for tokens in entries:
        unknown = missing_flags(tokens[1], flags(tokens[2:]))
        if unknown:
            problems.append(f"lambdasplit {tokens[1]}: {', '.join(sorted(unknown))}")
    assert not problems, f"{block.id}: flags listed in the docs but not in --help:\n" + "\n".join(problems)


# The README's demo (a server child process + 64 tokens) takes 15-20 s on 2 cores; the others are quick.
@pytest.mark.parametrize("block", blocks_of("commands", slow=lambda b: "lambdasplit demo" in b.text))
def test_command_block_runs(block, tmp_path):
    done = []
    for line in logical_lines(block.text):
        for tokens in commands(line):
            done.append(f"{shlex.join(tokens)}: {run_command(tokens, tmp_path)}")
    assert done, block.id
    print("\n".join(done))


class Background(ChildProcess):
    """A long-running command, up once `ready` shows up in its output."""

    def __init__(self, argv: list[str], cwd: Path, ready: str, timeout: float = 180) -> None:
        super().__init__(argv, name=shlex.join(argv), env=ENV, cwd=cwd)
        self.wait_for_line(re.escape(ready), timeout)


@pytest.mark.slow  # export + certs + server + generate + gateway: ~40 s on 2 cores
@pytest.mark.parametrize("block", blocks_of("two-machine"))
def test_two_machine_recipe_on_loopback(block, tmp_path):
    """The 'Across two machines' recipe, both sides on this machine: every host becomes 127.0.0.1,
    port 8470/8471 become free ports, DIR is a fresh `lambdasplit export`; generate gets -n 16."""
    body_port, api_port = free_port(), free_port()
    text = REMOTE_HOST.sub("127.0.0.1", block.text)
    text = text.replace(":8470", f":{body_port}").replace(":8471", f":{api_port}")
    text = text.replace("DIR/", f"{tmp_path}/parts/")
    lines = logical_lines(text)
    started = {line.split()[1] for line in lines if line.startswith("lambdasplit ")}
    assert {"serve", "generate"} <= started, lines
    from lambdasplit.split.export import export_parts

    # "export once": in-process, one CLI start (a transformers import) less.
    export_parts(None, (2, 2), tmp_path / "parts", None, False)
    background: list[Background] = []
    try:
        for line in lines:
            if not line.startswith("lambdasplit "):
                run(["bash", "-c", line], tmp_path)  # the token: head -c 32 /dev/urandom | base64 > token
                continue
            (tokens,) = commands(line)
            subcommand = tokens[1]
            unknown = missing_flags(subcommand, flags(tokens[2:]))
            assert not unknown, f"{line}: not in `lambdasplit {subcommand} --help`: {sorted(unknown)}"
            argv = [LAMBDASPLIT, *tokens[1:]]
            if subcommand == "serve":
                argv += ["--port", str(body_port)]
                background.append(Background(argv, tmp_path, "listening on wss://"))
            elif subcommand == "gateway":
                argv += ["--port", str(api_port)]
                background.append(Background(argv, tmp_path, "lambdasplit gateway:"))
            elif subcommand == "generate":
                out = run([*argv, "-n", "16"], tmp_path).stdout
                assert out.strip(), f"{line}: no text"
            else:
                run(argv, tmp_path)
        # "# any OpenAI client": the gateway's API answers.
        assert f'base_url="http://127.0.0.1:{api_port}/v1"' in text
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", max_retries=0,
                        timeout=120)
        deadline = time.time() + 60
        while True:  # uvicorn binds just after the gateway prints its address
            try:
                model = client.models.list().data[0].id  # named after the export's directory
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
                )
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        assert reply.choices[0].message.content.strip()
    finally:
        for proc in reversed(background):
            proc.stop()


INLINE = re.compile(r"`(?:\.venv/bin/)?lambdasplit ([a-z]+)((?: [^`]*)?)`")


def test_inline_commands_use_existing_flags():
    """Inline `lambdasplit SUB --flag ...` spans in the prose (not run: fenced blocks are) name
    subcommands and flags that exist."""
    problems = []
    for path in DOCS:
        for subcommand, rest in INLINE.findall(path.read_text()):
            try:
                unknown = missing_flags(subcommand, flags(shlex.split(rest)))
            except AssertionError as exc:
                problems.append(f"{path.name}: lambdasplit {subcommand}: {exc}")
                continue
            if unknown:
                problems.append(f"{path.name}: lambdasplit {subcommand}{rest}: {', '.join(sorted(unknown))}")
    assert not problems, "\n".join(problems)


def _tables_outside(text: str, start: str, end: str) -> list[str]:
    """The markdown table rows of `text` outside the generated sections (start ... end markers)."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith(end):
            inside = False
        elif line.startswith(start):
            inside = True
        elif not inside and line.startswith("|"):
            rows.append(line)
    return rows


def test_generated_tables_are_what_the_committed_data_gives():
    """docs/benchmarks.md's results section and docs/privacy.md's tables are rendered from committed
    JSON (`python -m benchmarks report`): a hand edit, or data changed without re-rendering, fails here,
    and so does a table of measured numbers written by hand next to them."""
    from benchmarks import privacy_tables, report

    benchmarks_md = (ROOT / "docs" / "benchmarks.md").read_text()
    generated = benchmarks_md.partition(report.START)[2].partition(report.END)[0]
    assert generated == "\n" + report.generated_section() + "\n", "docs/benchmarks.md: rerun `python -m benchmarks report`"
    privacy_md = privacy_tables.PAGE.read_text()
    assert sorted(m["name"] for m in privacy_tables.SECTION.finditer(privacy_md)) == sorted(privacy_tables.TABLES)
    assert privacy_md == privacy_tables.render(privacy_md), "docs/privacy.md: rerun `python -m benchmarks report`"
    by_hand = [row for row in _tables_outside(privacy_md, "<!-- generated:", "<!-- generated:end") if re.search(r"\d\.\d", row)]
    assert by_hand == [], "measured numbers in a hand-written table of docs/privacy.md"


def test_privacy_tables_refuse_a_marker_without_its_pair():
    """With one end marker gone, a section used to run on to the next section's end, and `python -m
    benchmarks report` silently deleted that section and the prose between them."""
    from benchmarks import privacy_tables

    page = privacy_tables.PAGE.read_text()
    broken = page.replace("<!-- generated:end -->", "", 1)
    first = page[:page.index("<!-- generated: ")].count("\n") + 1
    with pytest.raises(ValueError, match=rf"without its pair on line\(s\) \[{first}\]"):
        privacy_tables.render(broken)
