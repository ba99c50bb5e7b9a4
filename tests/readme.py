"""The README's shell commands, as a user would copy them, for the tests that run them.

A test runs a README command by naming it in full: `readme_argv("python -m search.export
--experiment runs/imbalance --top-k 3")` fails when the README no longer shows that command,
and tests/test_readme.py fails when the README shows a command that no test names. So the
README and what the tests run cannot drift apart.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # that starts a word, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _split_chain(command: str) -> list[str]:
    """`a && b` -> [a, b] (outside quotes)."""
    parts, quote, start = [], None, 0
    for i, char in enumerate(command):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif command.startswith(" && ", i):
            parts.append(command[start:i].strip())
            start = i + 4
    return [*parts, command[start:].strip()]


def readme_commands(text: str | None = None) -> list[str]:
    """Every command in the README's ```bash blocks, in order, without repeats: comments
    dropped, `\\` continuation lines joined, `&&` chains split into their commands."""
    text = README.read_text(encoding="utf-8") if text is None else text
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            for command in _split_chain(_strip_comment(line)):
                if command and command not in commands:
                    commands.append(command)
    return commands


def readme_argv(command: str, fill: dict[str, str] | None = None) -> list[str]:
    """The words of `command`, which must be one of the README's commands as written;
    `fill` replaces placeholders ({"HEAD_IP": "10.0.0.5"}) wherever they occur in a word."""
    assert command in readme_commands(), f"the README does not show this command (any more): {command}"
    words = shlex.split(command)
    for placeholder, value in (fill or {}).items():
        words = [word.replace(placeholder, value) for word in words]
    return words


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """`A=1 B=2 cmd args` -> ({"A": "1", "B": "2"}, ["cmd", "args"]): a shell's variable prefix."""
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        key, value = words[0].split("=", 1)
        env[key] = value
        words = words[1:]
    return env, words
