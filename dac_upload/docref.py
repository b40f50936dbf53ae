"""The reference parts of docs/ made from the code, so that they cannot drift: the job-file
keys (config.SECTIONS), each command's --help (click) and the exit codes (errors). Each goes
between ``<!-- BEGIN GENERATED name -->`` and ``<!-- END GENERATED name -->`` in a page;
``python -m dac_upload.docref [DOCS_DIR]`` (default ./docs) rewrites them, and a unit test
fails when a page is stale."""

from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable


def _toml(value: Any) -> str:
    if value is ...:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, (tuple, list)):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def job_file_keys() -> str:
    """One table per section: key, default, what a valid value looks like."""
    from .config import SECTIONS

    out: list[str] = []
    for section, cls in SECTIONS.items():
        title = "[[butler.map]]" if section == "butler.map" else f"[{section}]"
        out += [f"### `{title}` keys", "", "| key | default | value |", "|---|---|---|"]
        for f in fields(cls):
            if "check" not in f.metadata:
                continue
            key = f.metadata["key"] or f.name
            out.append(f"| `{key}` | {_toml(f.metadata['default'])} | "
                       f"{_cell(f.metadata['expect'])} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def cli_help() -> str:
    """``dac-upload --help`` and each command's, as click prints them (100 columns)."""
    import click

    from .cli import main

    def context(cmd: click.Command, name: str, parent: click.Context | None) -> click.Context:
        return cmd.make_context(name, [], parent=parent, resilient_parsing=True,
                                terminal_width=100, max_content_width=100)

    top = context(main, "dac-upload", None)
    out = ["```text", main.get_help(top), "```", ""]
    for name in sorted(main.list_commands(top)):
        cmd = main.get_command(top, name)
        if cmd is None or cmd.hidden:
            continue
        out += [f"### `dac-upload {name}`", "", "```text",
                cmd.get_help(context(cmd, name, top)), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def exit_codes() -> str:
    from .errors import EXIT_MEANING, TASK_EXIT_MEANING

    out = ["The commands (`dac-upload …`, nightly included):", "", "| code | meaning |",
           "|---|---|"]
    out += [f"| {code} | {_cell(text)} |" for code, text in sorted(EXIT_MEANING.items())]
    out += ["", "An array task (its log's last line, and `exit_code` in its "
            "`results/task-N.done.json`):", "", "| code | meaning |", "|---|---|"]
    out += [f"| {code} | {_cell(text)} |" for code, text in sorted(TASK_EXIT_MEANING.items())]
    return "\n".join(out) + "\n"


BLOCKS: dict[str, Callable[[], str]] = {
    "job-file-keys": job_file_keys, "cli-help": cli_help, "exit-codes": exit_codes,
}
_BLOCK_RE = re.compile(r"(<!-- BEGIN GENERATED ([a-z-]+) -->\n)(.*?)(<!-- END GENERATED \2 -->)",
                       re.DOTALL)


def regenerate(text: str) -> tuple[str, set[str]]:
    """``text`` with every generated block made again, and the names of the blocks found."""
    found: set[str] = set()

    def fill(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block {name!r}")
        found.add(name)
        return m.group(1) + "\n" + BLOCKS[name]() + "\n" + m.group(4)

    return _BLOCK_RE.sub(fill, text), found


def pages(docs: Path) -> dict[Path, tuple[str, str]]:
    """Each page with a generated block -> (its text, its text regenerated)."""
    out: dict[Path, tuple[str, str]] = {}
    for page in sorted(docs.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        new, found = regenerate(text)
        if found:
            out[page] = (text, new)
    return out


def main(argv: list[str] | None = None) -> int:
    """Rewrite the generated blocks of DOCS_DIR (``--check``: only say which are stale)."""
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    docs = Path(next((a for a in args if not a.startswith("-")), "docs"))
    made = pages(docs)
    stale = [page for page, (old, new) in made.items() if old != new]
    for page in stale:
        if check:
            print(f"{page}: generated reference out of date: python -m dac_upload.docref")
        else:
            page.write_text(made[page][1], encoding="utf-8")
            print(f"rewrote {page}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
