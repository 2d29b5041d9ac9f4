"""The commands README.md and docs/ tell a user to type, read from the docs themselves.

A fenced block tagged `bash` or `sh` holds commands: each non-blank line that is not a comment is one
(a trailing `# ...` is a remark; a line ending in a backslash continues). A block tagged `python` is one
program. Anything else (`text`, `json`, untagged) is shown, not typed: synopses with placeholders go there.
tests/test_doc_commands.py runs every block, so a doc that drifts from the code fails the suite.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMAND_TAGS = ("bash", "sh")
PROGRAM_TAGS = ("python",)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<tag>[\w+-]*)[ \t]*$")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    tag: str
    commands: tuple[str, ...]  # bash/sh: one entry per command; python: the whole program

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def first(self) -> str:
        return self.commands[0] if self.commands else ""


def doc_files(root: Path = REPO_ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def strip_remark(line: str) -> str:
    """The command without a trailing `# remark` (as bash reads it: an unquoted # that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def blocks_of(path: Path, root: Path = REPO_ROOT) -> list[Block]:
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        tag, start, body = m.group("tag").lower(), i + 1, []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i][len(m.group("indent")):] if lines[i].startswith(m.group("indent")) else lines[i])
            i += 1
        i += 1  # the closing fence
        rel = path.relative_to(root).as_posix()
        if tag in PROGRAM_TAGS:
            out.append(Block(rel, start, tag, ("\n".join(body).strip() + "\n",)))
        elif tag in COMMAND_TAGS:
            commands, pending = [], ""
            for raw in body:
                if pending:
                    raw = pending + " " + raw.strip()
                    pending = ""
                if raw.rstrip().endswith("\\"):
                    pending = raw.rstrip()[:-1].rstrip()
                    continue
                command = strip_remark(raw)
                if command:
                    commands.append(command)
            out.append(Block(rel, start, tag, tuple(commands)))
    return out


def documented_blocks(root: Path = REPO_ROOT) -> list[Block]:
    return [b for path in doc_files(root) for b in blocks_of(path, root)]
