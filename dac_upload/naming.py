"""Rucio naming rules and glob matching: pure functions, no I/O.

The rules are those of Rucio's ``generic`` schema (``rucio/common/schema/generic.py``): a
name is at most 250 characters of ``/A-Za-z0-9._-`` and starts with ``/`` or an alphanumeric;
a scope is at most 25 characters of ``A-Za-z0-9._-``. Checking them at plan time turns an
error that Rucio would give file by file, inside a batch job, into one line before submission.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

NAME_MAX = 250
SCOPE_MAX = 25
ACCOUNT_MAX = 25
_NAME_RE = re.compile(r"[/A-Za-z0-9][/A-Za-z0-9._\-]*")
_NAME_BAD_CHAR_RE = re.compile(r"[^/A-Za-z0-9._\-]")
_SCOPE_RE = re.compile(r"[A-Za-z0-9._\-]+")
_ACCOUNT_RE = re.compile(r"[a-z0-9_\-]+")
_RSE_RE = re.compile(r"[A-Z0-9]+([_\-][A-Z0-9]+)*")


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Rucio DID name, or None if it is."""
    if not name:
        return "the name is empty"
    if len(name) > NAME_MAX:
        return f"the name is {len(name)} characters long, Rucio allows at most {NAME_MAX}"
    if not _NAME_RE.fullmatch(name):
        bad = sorted(set(_NAME_BAD_CHAR_RE.findall(name)))
        if bad:
            shown = " ".join(repr(c) for c in bad[:5])
            return f"the name contains characters Rucio does not allow: {shown}"
        return "a Rucio name must start with a letter, a digit or '/'"
    return None


_ANY_BAD_CHAR_RE = re.compile(r"[^/A-Za-z0-9._\-\n]")       # one class: a fast scan
_ANY_BAD_START_RE = re.compile(r"\n[._\-\n]")


def all_names_valid(rels: Sequence[str], prefix: str = "") -> bool:
    """True if :func:`name_problem` finds nothing in any of the names ``prefix + rel``,
    without making them: one regex search over the relpaths, joined by newlines (which no
    valid name contains) 65,536 at a time, the prefix's own test, and the longest length."""
    if not rels or len(prefix) + max(map(len, rels)) > NAME_MAX:
        return False
    if prefix and ("\n" in prefix or prefix[0] in "._-"
                   or _ANY_BAD_CHAR_RE.search(prefix) is not None):
        return False
    step = 1 << 16
    for i in range(0, len(rels), step):
        part = rels[i:i + step]
        joined = "\n".join(part)
        if joined.count("\n") != len(part) - 1 or _ANY_BAD_CHAR_RE.search(joined) is not None:
            return False
        if not prefix and (joined[:1] in ("", ".", "_", "-", "\n") or joined[-1:] == "\n"
                           or _ANY_BAD_START_RE.search(joined) is not None):
            return False
    return True


def scope_problem(scope: str) -> str | None:
    if not scope or len(scope) > SCOPE_MAX or not _SCOPE_RE.fullmatch(scope):
        return f"a scope is 1-{SCOPE_MAX} characters of A-Z a-z 0-9 . _ -"
    return None


def account_problem(account: str) -> str | None:
    if not account or len(account) > ACCOUNT_MAX or not _ACCOUNT_RE.fullmatch(account):
        return f"an account is 1-{ACCOUNT_MAX} characters of a-z 0-9 _ -"
    return None


def rse_problem(rse: str) -> str | None:
    if not _RSE_RE.fullmatch(rse):
        return "an RSE name is upper-case letters and digits separated by single '_' or '-'"
    return None


def make_name(relpath: str, prefix: str = "", replace_invalid: str | None = None) -> str:
    """Rucio name for a file at ``relpath`` (POSIX, relative to the source root).

    The name is ``prefix + relpath``, so the tree at the destination mirrors the source. With
    ``replace_invalid`` each character Rucio refuses is replaced by that string; without it the
    name is returned as is and :func:`name_problem` reports it.
    """
    name = prefix + relpath
    if replace_invalid is not None:
        name = _NAME_BAD_CHAR_RE.sub(replace_invalid, name)
    return name


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a recursive glob (``**/*.fits``, ``raw/*/c?.fits``) matched against a POSIX
    relative path, with the shell's rules: ``*``, ``?`` and ``[...]`` never cross ``/``;
    ``**`` as a whole component matches any number of directories (zero included); a name
    starting with ``.`` (a hidden file or directory) is matched only by a component that
    starts with ``.`` itself, so ``**/*`` does not pick up ``.DS_Store`` or ``.snapshot/``."""
    parts = pattern.strip("/").split("/")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(r"(?!\.)[^/]*(?:/(?!\.)[^/]*)*" if last else r"(?:(?!\.)[^/]+/)*")
            continue
        hidden_ok = part.startswith(".")
        out.append(("" if hidden_ok else r"(?!\.)") + _translate_component(part)
                   + ("" if last else "/"))
    return re.compile("^" + "".join(out) + r"\Z", re.DOTALL)


def _translate_component(part: str) -> str:
    res = []
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        i += 1
        if c == "*":
            res.append("[^/]*")
        elif c == "?":
            res.append("[^/]")
        elif c == "[":
            j = i
            if j < n and part[j] in "!^":
                j += 1
            if j < n and part[j] == "]":
                j += 1
            while j < n and part[j] != "]":
                j += 1
            if j >= n:
                res.append("\\[")
            else:
                body = part[i:j].replace("\\", "\\\\").replace("/", "")
                i = j + 1
                if body[:1] in "!^":
                    body = "^/" + body[1:]  # a negated class must not match '/' either
                res.append("[" + body + "]")
        else:
            res.append(re.escape(c))
    return "".join(res)


_GLOB_CHARS = frozenset("*?[]\\")


@lru_cache(maxsize=256)
def glob_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate equal to ``glob_regex(pattern).fullmatch``, made of plain string tests for
    the patterns nearly every job uses (``**/*``, ``**/*.fits``): a regex per file was a
    quarter of the time of cataloguing a million files. Others get the regex."""
    parts = pattern.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "**" and parts[1].startswith("*") \
            and not _GLOB_CHARS & set(parts[1][1:]):
        suffix = parts[1][1:]

        def visible_with_suffix(rel: str) -> bool:
            # no component starts with "." (the shell's rule for * and **), and the name
            # ends with the suffix (which holds no "/", so it lies within the name)
            return rel[:1] != "." and "/." not in rel and rel.endswith(suffix)

        visible_with_suffix.visible_suffix = suffix  # type: ignore[attr-defined]
        return visible_with_suffix   # (the walk tests a whole directory's names with it)
    rx = glob_regex(pattern)
    return lambda rel: rx.fullmatch(rel) is not None


def matches_any(relpath: str, patterns: tuple[str, ...]) -> bool:
    return any(glob_regex(p).fullmatch(relpath) for p in patterns)


def dir_pruned(reldir: str, exclude: tuple[str, ...]) -> bool:
    """True if every file below directory ``reldir`` is excluded by a ``.../**`` pattern, so
    the walk need not enter it (e.g. ``**/tmp/**`` prunes every ``tmp`` directory)."""
    for pattern in exclude:
        if pattern.endswith("/**") and glob_regex(pattern[:-3]).fullmatch(reldir):
            return True
    return False
