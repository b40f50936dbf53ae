"""The one job-file builder of both test layers: each layer's base lines per section, and a
test's own lines added to each section. The bases are the layers' own:
``tests/unit/unit_helpers.py`` (a local tree, a Rucio that is never reached) and
``tests/integration/ithelpers.py`` (``../src`` into the test Rucio)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

# the sections a builder writes, in this order ([butler] and [[butler.map]] a test appends)
SECTIONS = ("job", "source", "rucio", "naming", "upload", "packing", "batching", "slurm",
            "container")


def job_text(base: Mapping[str, str], **extra: str) -> str:
    """A job file: ``base[section]`` lines, then ``extra[section]`` lines, per section."""
    unknown = (set(base) | set(extra)) - set(SECTIONS)
    assert not unknown, unknown
    out = []
    for section in SECTIONS:
        lines = "\n".join(x for x in (textwrap.dedent(base.get(section, "")).strip(),
                                      textwrap.dedent(extra.get(section, "")).strip()) if x)
        if lines:
            out.append(f"[{section}]\n{lines}\n")
    return "\n".join(out)
