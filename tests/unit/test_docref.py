"""The generated reference in docs/ is what the code says now (python -m dac_upload.docref
rewrites it): the job-file keys, each command's help, the exit codes."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from dac_upload import docref
from dac_upload.config import SECTIONS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_generated_block_is_in_a_page() -> None:
    found: set[str] = set()
    for text, _ in docref.pages(DOCS).values():
        found |= docref.regenerate(text)[1]
    assert found == set(docref.BLOCKS)


def _block(text: str, name: str) -> str:
    begin, end = f"<!-- BEGIN GENERATED {name} -->", f"<!-- END GENERATED {name} -->"
    return text[text.index(begin) + len(begin):text.index(end)].strip("\n") + "\n"


def test_the_generated_reference_is_current() -> None:
    """The keys and exit codes exactly; the commands' help by each command and option (its
    wrapping is click's, which may change with click's version)."""
    import click

    from dac_upload.cli import main

    pages = {name: text for text, _ in docref.pages(DOCS).values()
             for name in docref.regenerate(text)[1]}
    fix = "out of date: run python -m dac_upload.docref"
    assert _block(pages["job-file-keys"], "job-file-keys") == docref.job_file_keys(), fix
    assert _block(pages["exit-codes"], "exit-codes") == docref.exit_codes(), fix
    shown = _block(pages["cli-help"], "cli-help")
    for name, cmd in main.commands.items():
        if cmd.hidden:
            continue
        assert f"### `dac-upload {name}`" in shown, fix
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert any(flag in shown for flag in param.opts), (name, param.opts, fix)


def test_the_key_table_lists_every_declared_key() -> None:
    table = docref.job_file_keys()
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if "check" in f.metadata:
                assert f"| `{f.metadata['key'] or f.name}` |" in table, (section, f.name)
