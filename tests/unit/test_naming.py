"""naming: Rucio name/scope rules, make_name, recursive globs, directory pruning."""

from __future__ import annotations

from typing import Callable

import pytest

from dac_upload.naming import (
    account_problem,
    dir_pruned,
    glob_regex,
    make_name,
    matches_any,
    name_problem,
    rse_problem,
    scope_problem,
)


# ----------------------------------------------------------------------------- name_problem
@pytest.mark.parametrize("name", [
    "a.fits",
    "dp1/raw/2024-01-01/calexp_0001.fits",
    "/atlas/style/name",
    "0_starts-with.digit",
    "A" * 250,
])
def test_valid_names(name: str) -> None:
    assert name_problem(name) is None


def test_space_is_rejected_and_named() -> None:
    problem = name_problem("raw/my file.fits")
    assert problem is not None
    assert "' '" in problem
    assert "not allow" in problem


def test_non_ascii_is_rejected_and_named() -> None:
    problem = name_problem("raw/Müller.fits")
    assert problem is not None
    assert "'ü'" in problem


def test_bad_characters_listed_once_each_sorted() -> None:
    problem = name_problem("a b c:d:e")
    assert problem is not None
    assert problem.endswith("' ' ':'")


def test_length_limit_is_250() -> None:
    assert name_problem("a" * 250) is None
    problem = name_problem("a" * 251)
    assert problem is not None
    assert "251" in problem and "250" in problem


@pytest.mark.parametrize("name", [".hidden", "-dash", "_under", "./a"])
def test_must_start_with_alnum_or_slash(name: str) -> None:
    assert name_problem(name) == "a Rucio name must start with a letter, a digit or '/'"


@pytest.mark.parametrize("check", [name_problem, scope_problem, account_problem, rse_problem])
def test_trailing_newline_rejected(check: Callable[[str], str | None]) -> None:
    valid = {name_problem: "a.fits", scope_problem: "user.x", account_problem: "jb",
             rse_problem: "RAL_ECHO"}[check]
    assert check(valid) is None
    assert check(valid + "\n") is not None


def test_empty_name() -> None:
    assert name_problem("") == "the name is empty"


# ----------------------------------------------------------------------------- scope etc.
@pytest.mark.parametrize("scope", ["user.jbloggs", "dp1", "A-b_c.9", "x" * 25])
def test_valid_scopes(scope: str) -> None:
    assert scope_problem(scope) is None


@pytest.mark.parametrize("scope", ["", "x" * 26, "user jbloggs", "user/jb", "user:jb", "ü"])
def test_invalid_scopes(scope: str) -> None:
    assert scope_problem(scope) == "a scope is 1-25 characters of A-Z a-z 0-9 . _ -"


def test_account_rules() -> None:
    assert account_problem("jbloggs") is None
    assert account_problem("root-2_x") is None
    assert account_problem("JBloggs") is not None
    assert account_problem("a.b") is not None
    assert account_problem("a" * 26) is not None


def test_rse_rules() -> None:
    assert rse_problem("RAL_ECHO") is None
    assert rse_problem("CSD3-DISK2") is None
    assert rse_problem("ral_echo") is not None
    assert rse_problem("RAL__ECHO") is not None
    assert rse_problem("_RAL") is not None


# ----------------------------------------------------------------------------- make_name
def test_make_name_prefix_mirrors_tree() -> None:
    assert make_name("raw/a.fits") == "raw/a.fits"
    assert make_name("raw/a.fits", prefix="dp1/") == "dp1/raw/a.fits"


def test_make_name_without_replacement_keeps_bad_characters() -> None:
    assert make_name("my file.fits", "p/") == "p/my file.fits"


def test_make_name_replace_invalid() -> None:
    assert make_name("my file (1)ü.fits", "p/", "_") == "p/my_file__1__.fits"
    assert make_name("a b", replace_invalid="") == "ab"
    assert name_problem(make_name("x/a b&c.fits", replace_invalid="-")) is None


# ----------------------------------------------------------------------------- glob_regex
def _m(pattern: str, path: str) -> bool:
    return glob_regex(pattern).match(path) is not None


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("**/*.fits", "a.fits", True),
    ("**/*.fits", "x/a.fits", True),
    ("**/*.fits", "x/y/a.fits", True),
    ("**/*.fits", "x/y/a.fits.gz", False),
    ("*.fits", "a.fits", True),
    ("*.fits", "x/a.fits", False),
    ("raw/**", "raw/a", True),
    ("raw/**", "raw/a/b", True),
    ("raw/**", "rawx/a", False),
    ("raw/**", "calib/raw/a", False),
    ("raw/*/c?.fits", "raw/d1/c1.fits", True),
    ("raw/*/c?.fits", "raw/d1/c12.fits", False),
    ("raw/*/c?.fits", "raw/d1/d2/c1.fits", False),
    ("a/**/b.txt", "a/b.txt", True),
    ("a/**/b.txt", "a/x/y/b.txt", True),
    ("a/**/b.txt", "ab.txt", False),
    ("c?.fits", "c/.fits", False),
    ("[ab].fits", "a.fits", True),
    ("[ab].fits", "b.fits", True),
    ("[ab].fits", "c.fits", False),
    ("[!ab].fits", "c.fits", True),
    ("[!ab].fits", "a.fits", False),
    ("[^ab].fits", "a.fits", False),
    ("f[0-9].fits", "f7.fits", True),
    ("f[0-9].fits", "fx.fits", False),
    ("[.fits", "[.fits", True),
    ("a+b(1).fits", "a+b(1).fits", True),
    ("a+b(1).fits", "aab1.fits", False),
])
def test_glob_semantics(pattern: str, path: str, expected: bool) -> None:
    assert _m(pattern, path) is expected


@pytest.mark.parametrize("path", ["a/b", "x/a/b", "a/b/c/d"])
def test_star_never_crosses_slash(path: str) -> None:
    assert not _m("*", path)
    assert not _m("a*", path)
    assert not _m("*b", path)
    assert _m("**", path)


def test_star_matches_within_component() -> None:
    assert _m("*", "anything.at.all")
    assert _m("*", "")  # no component at all: harmless, the walk never yields ''


def test_negated_class_never_crosses_slash() -> None:
    assert not _m("a[!b]c", "a/c")


def test_matches_any() -> None:
    assert matches_any("x/a.fits", ("*.txt", "**/*.fits"))
    assert not matches_any("x/a.fits", ("*.txt", "*.fits"))
    assert not matches_any("x/a.fits", ())


# ----------------------------------------------------------------------------- dir_pruned
@pytest.mark.parametrize(("reldir", "expected"), [
    ("tmp", True),
    ("a/tmp", True),
    ("a/b/tmp", True),
    ("tmpx", False),
    ("a/xtmp", False),
    ("tmp2/a", False),
    ("a", False),
])
def test_dir_pruned_recursive_pattern(reldir: str, expected: bool) -> None:
    assert dir_pruned(reldir, ("**/tmp/**",)) is expected


def test_dir_pruned_anchored_pattern() -> None:
    assert dir_pruned("raw", ("raw/**",))
    assert not dir_pruned("calib/raw", ("raw/**",))
    assert dir_pruned("raw/sub", ("raw/sub/**",))
    assert not dir_pruned("raw", ("raw/sub/**",))


def test_dir_pruned_needs_a_trailing_double_star() -> None:
    # these exclude files but never a whole directory
    assert not dir_pruned("tmp", ("**/tmp", "**/tmp/*", "*.fits"))
    assert not dir_pruned("tmp", ())


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("**/*", ".DS_Store", False),
    ("**/*", "a/.hidden.fits", False),
    ("**/*.fits", ".snapshot/a.fits", False),
    ("**/.*", "a/.hidden", True),
    (".snapshot/**", ".snapshot/a.fits", True),
    ("**/*", "a/b.fits", True),
])
def test_hidden_names_follow_the_shell(pattern: str, path: str, expected: bool) -> None:
    """Like the shell and Python's glob: '*' and '**' do not match a leading '.'."""
    assert bool(glob_regex(pattern).match(path)) is expected


# ----------------------------------------------------------------------------- fast paths
def _paths() -> list[str]:
    import itertools

    comps = ["a", ".a", "b.fits", ".fits", "fits", "x.f", ".x.fits", "c", "s", "é.fits"]
    out = ["a\nb.fits", "..fits", "b/..fits"]
    for n in range(1, 4):
        out += ["/".join(c) for c in itertools.product(comps, repeat=n)]
    return out


@pytest.mark.parametrize("pattern", ["**/*", "**/*.fits", "**/*fits", "**/*.f", "**/*s",
                                     "/**/*.fits/", "raw/*.fits", "**/c/*"])
def test_glob_matcher_equals_the_regex(pattern: str) -> None:
    from dac_upload.naming import glob_matcher

    matches = glob_matcher(pattern)
    rx = glob_regex(pattern)
    assert [p for p in _paths() if matches(p)] == [p for p in _paths() if rx.fullmatch(p)]


def test_all_names_valid_equals_name_problem_name_by_name() -> None:
    import itertools
    import random

    from dac_upload.naming import all_names_valid

    chars = ["a", "Z", "0", "/", ".", "_", "-", " ", "é", "\n", ":"]
    for n in range(5):
        for combo in itertools.product(chars, repeat=n):
            name = "".join(combo)
            assert all_names_valid([name]) == (name_problem(name) is None), repr(name)
    rng = random.Random(1)
    for _ in range(20000):
        names = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 6)))
                 for _ in range(rng.randint(1, 4))]
        assert all_names_valid(names) == all(name_problem(x) is None for x in names), names
    assert all_names_valid(["a" * 250]) and not all_names_valid(["a" * 251])
    assert not all_names_valid([])


def test_all_names_valid_with_a_prefix_equals_name_problem_of_the_whole_name() -> None:
    """plan tests prefix and relpaths apart (no name is made): the same answer as the whole
    name's, also across the 65,536-name blocks it joins."""
    import random

    from dac_upload.naming import all_names_valid

    chars = ["a", "Z", "0", "/", ".", "_", "-", " ", "é", "\n"]
    rng = random.Random(3)
    for _ in range(20000):
        prefix = "".join(rng.choice(chars) for _ in range(rng.randint(0, 3)))
        rels = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 5)))
                for _ in range(rng.randint(1, 4))]
        assert all_names_valid(rels, prefix) == \
            all(name_problem(prefix + r) is None for r in rels), (prefix, rels)
    many = [f"d/f{i}" for i in range(70000)]
    assert all_names_valid(many, "p/")
    assert not all_names_valid([*many[:65536], ".x", *many[65536:]])
    assert not all_names_valid([*many[:65535], "x y", *many[65535:]], "p/")
    assert not all_names_valid(["a" * 249], "p/") and all_names_valid(["a" * 249], "p")
