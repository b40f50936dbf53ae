"""plan: naming the catalogue, balanced batches under both limits, array indices, layout."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from dac_upload.catalogue import Columns, Entry
from dac_upload.config import NamingConfig
from dac_upload.plan import (
    NAME,
    REL,
    SIZE,
    Batch,
    PlannedFile,
    compress_indices,
    make_batches,
    name_files,
)
from dac_upload.runrecord import RunLayout

SEEDS = (1, 7, 42, 2024)


def _files(sizes: Sequence[int]) -> list[PlannedFile]:
    return [(f"d{i % 5}/f{i:04d}.fits", f"n/d{i % 5}/f{i:04d}.fits", s, 1.0)
            for i, s in enumerate(sizes)]


def _random_files(seed: int, n: int = 500) -> list[PlannedFile]:
    rng = random.Random(seed)
    # mostly small files, some big ones, a few empty: like a real data tree
    sizes = [rng.choice((0, rng.randint(1, 10**3), rng.randint(10**3, 10**6),
                         rng.randint(10**6, 5 * 10**7))) for _ in range(n)]
    return _files(sizes)


def _check_partition(files: Sequence[PlannedFile], batches: list[Batch]) -> None:
    """Every file exactly once; indices 0..n-1; files of a batch in path order."""
    seen = Counter(f for b in batches for f in b.files)
    assert seen == Counter(files)
    assert [b.index for b in batches] == list(range(len(batches)))
    for b in batches:
        assert b.files, "no empty batch"
        assert list(b.files) == sorted(b.files, key=lambda f: f[REL])
        assert b.bytes == sum(f[SIZE] for f in b.files)


# ----------------------------------------------------------------------------- make_batches
def test_empty_input() -> None:
    assert make_batches([], 10, 10**9) == []
    assert make_batches([], None, None) == []


def test_no_limits_one_batch() -> None:
    files = _files([5, 1, 3])
    batches = make_batches(files, None, None)
    assert len(batches) == 1
    assert [f[REL] for f in batches[0].files] == sorted(f[REL] for f in files)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("files_per_batch", [1, 7, 64, 1000])
def test_files_per_batch_respected(seed: int, files_per_batch: int) -> None:
    files = _random_files(seed)
    batches = make_batches(files, files_per_batch, None)
    _check_partition(files, batches)
    assert max(len(b.files) for b in batches) <= files_per_batch
    assert len(batches) == -(-len(files) // files_per_batch)  # no more batches than needed


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [1, 2, 999, 1000, 1001, 1999, 2500])
def test_files_per_batch_only_is_balanced(seed: int, n: int) -> None:
    """Only a file limit ("snake"): the fewest batches, counts within one of each other,
    bytes within the largest file; the same batches whatever the input order."""
    rng = random.Random(seed)
    files = _files([rng.choice((0, rng.randint(1, 10**4), rng.randint(10**6, 10**9)))
                    for _ in range(n)])
    batches = make_batches(files, 100, None)
    _check_partition(files, batches)
    counts = [len(b.files) for b in batches]
    sizes = [b.bytes for b in batches]
    assert len(batches) == -(-n // 100) and max(counts) <= 100
    assert max(counts) - min(counts) <= 1, counts
    assert max(sizes) - min(sizes) <= max(f[SIZE] for f in files), sizes
    shuffled = list(files)
    rng.shuffle(shuffled)
    assert make_batches(shuffled, 100, None) == batches


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bytes_per_batch", [10**6, 5 * 10**7, 10**8, 10**9])
def test_bytes_per_batch_respected(seed: int, bytes_per_batch: int) -> None:
    files = _random_files(seed)
    batches = make_batches(files, None, bytes_per_batch)
    _check_partition(files, batches)
    for b in batches:
        # a file larger than the limit gets a batch of its own, else the limit holds
        assert b.bytes <= bytes_per_batch or len(b.files) == 1, (b.bytes, len(b.files))
    for f in files:
        if f[SIZE] > bytes_per_batch:
            assert any(b.files == (f,) for b in batches)
    if all(f[SIZE] <= bytes_per_batch for f in files):
        assert len(batches) >= -(-sum(f[SIZE] for f in files) // bytes_per_batch)


@pytest.mark.parametrize("seed", SEEDS)
def test_both_limits_respected(seed: int) -> None:
    files = _random_files(seed)
    for files_per_batch, bytes_per_batch in ((10, 10**8), (100, 2 * 10**7), (3, 10**9)):
        batches = make_batches(files, files_per_batch, bytes_per_batch)
        _check_partition(files, batches)
        for b in batches:
            assert len(b.files) <= files_per_batch
            assert b.bytes <= bytes_per_batch or len(b.files) == 1


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("limit_factor", [1.5, 3, 10])
def test_balanced_by_bytes(seed: int, limit_factor: float) -> None:
    """With only a byte limit, LPT keeps max - min batch bytes within the largest file."""
    rng = random.Random(seed)
    files = _files([rng.randint(1, 10**6) for _ in range(500)])
    total = sum(f[SIZE] for f in files)
    largest = max(f[SIZE] for f in files)
    bytes_per_batch = int(total / limit_factor) + largest
    batches = make_batches(files, None, bytes_per_batch)
    _check_partition(files, batches)
    sizes = [b.bytes for b in batches]
    assert len(batches) == -(-total // bytes_per_batch)
    assert max(sizes) - min(sizes) <= largest, sizes


def test_balanced_when_an_extra_batch_is_needed() -> None:
    files = _files([60, 60, 35, 35, 10])
    batches = make_batches(files, None, 100)
    _check_partition(files, batches)
    sizes = [b.bytes for b in batches]
    assert max(sizes) <= 100
    assert max(sizes) - min(sizes) <= 60, sizes


@pytest.mark.parametrize("seed", SEEDS)
def test_balanced_even_when_the_minimum_batch_count_does_not_fit(seed: int) -> None:
    """Sizes just over a third of the limit cannot pack into the minimum count: the plan is
    redone with more batches instead of leaving a nearly empty overflow batch."""
    rng = random.Random(seed)
    files = _files([rng.randint(34, 60) for _ in range(200)])
    batches = make_batches(files, None, 100)
    _check_partition(files, batches)
    sizes = [b.bytes for b in batches]
    assert max(sizes) <= 100
    assert max(sizes) - min(sizes) <= 60, sizes


def test_oversized_file_gets_its_own_batch() -> None:
    files = _files([250, 40, 30, 20, 10])
    batches = make_batches(files, None, 100)
    _check_partition(files, batches)
    big = [b for b in batches if any(f[SIZE] == 250 for f in b.files)]
    assert len(big) == 1 and len(big[0].files) == 1
    assert all(b.bytes <= 100 for b in batches if b is not big[0])


def test_lpt_small_example() -> None:
    files = _files([10, 9, 8, 7, 6, 5])  # total 45 -> 3 batches of 15
    batches = make_batches(files, None, 15)
    assert sorted(b.bytes for b in batches) == [15, 15, 15]
    assert sorted(sorted(f[SIZE] for f in b.files) for b in batches) == [[5, 10], [6, 9], [7, 8]]


@pytest.mark.parametrize("seed", SEEDS)
def test_deterministic_under_shuffling(seed: int) -> None:
    files = _random_files(seed, 300)
    # equal sizes force the relpath tie-break
    files += [(f"tie/{i:02d}", f"tie/{i:02d}", 777, 0.0) for i in range(20)]
    expected = make_batches(files, 25, 10**8)
    rng = random.Random(seed)
    for _ in range(3):
        shuffled = list(files)
        rng.shuffle(shuffled)
        assert make_batches(shuffled, 25, 10**8) == expected


def test_batches_ordered_by_first_path() -> None:
    batches = make_batches(_random_files(3, 200), 20, None)
    firsts = [b.files[0][REL] for b in batches]
    assert firsts == sorted(firsts)


# ----------------------------------------------------------------------------- name_files
def _entries(*relpaths: str) -> list[Entry]:
    return [Entry(r, i + 1, 100.0 + i) for i, r in enumerate(relpaths)]


def test_name_files_plain() -> None:
    files, problems = name_files(_entries("a.fits", "raw/b.fits"), NamingConfig("dp1/", None))
    assert problems == []
    assert files == [("a.fits", "dp1/a.fits", 1, 100.0),
                     ("raw/b.fits", "dp1/raw/b.fits", 2, 101.0)]


def test_invalid_characters_reported_with_replace_invalid_hint() -> None:
    files, problems = name_files(_entries("ok.fits", "my file.fits", "Müller.fits"),
                                 NamingConfig("", None))
    assert [f[REL] for f in files] == ["ok.fits"]
    assert [p.relpath for p in problems] == ["my file.fits", "Müller.fits"]
    assert problems[0].reason == ("the name contains characters Rucio does not allow: ' '; "
                                  'rename the file, exclude it, or set [naming] '
                                  'replace_invalid = "_"')
    assert "'ü'" in problems[1].reason
    assert problems[1].reason.endswith('set [naming] replace_invalid = "_"')


def test_replace_invalid_fixes_names() -> None:
    files, problems = name_files(_entries("my file.fits", "x/Müller.fits"),
                                 NamingConfig("", "_"))
    assert problems == []
    assert [f[NAME] for f in files] == ["my_file.fits", "x/M_ller.fits"]
    assert [f[REL] for f in files] == ["my file.fits", "x/Müller.fits"]


def test_duplicates_after_replace_invalid_reported() -> None:
    files, problems = name_files(_entries("a b.fits", "a_b.fits", "a&b.fits", "c.fits"),
                                 NamingConfig("", "_"))
    assert [(f[REL], f[NAME]) for f in files] == [("a b.fits", "a_b.fits"),
                                                   ("c.fits", "c.fits")]
    assert [p.relpath for p in problems] == ["a_b.fits", "a&b.fits"]
    assert problems[0].reason == ("gets the same Rucio name 'a_b.fits' as 'a b.fits'; "
                                  "rename one of them or change [naming]")


def test_too_long_names_reported_with_shorten_fix() -> None:
    long_rel = "d/" + "x" * 240 + ".fits"  # 247 chars: fine alone, too long with a prefix
    files, problems = name_files(_entries(long_rel), NamingConfig("", None))
    assert problems == [] and files[0][NAME] == long_rel
    files, problems = name_files(_entries(long_rel, "ok"), NamingConfig("prefix/", None))
    assert [f[NAME] for f in files] == ["prefix/ok"]
    assert len(problems) == 1
    assert problems[0].relpath == long_rel
    assert "254 characters long, Rucio allows at most 250" in problems[0].reason
    assert problems[0].reason.endswith("shorten the path or the [naming] prefix, or exclude it")


def test_leading_dot_with_replace_invalid_still_refused() -> None:
    files, problems = name_files(_entries(".hidden"), NamingConfig("", "_"))
    assert files == []
    assert problems[0].reason == ("a Rucio name must start with a letter, a digit or '/'; "
                                  "rename the file or exclude it")


def test_name_files_takes_a_catalogue_files_columns() -> None:
    """Read from a catalogue file, the files come as columns; the same plan either way."""
    entries = _entries("b/x.fits", "a.fits", "b.fits")   # not in order: the set decides
    cols = Columns(*map(list, zip(*entries)))
    assert name_files(cols, NamingConfig("dp1/", None)) == \
        name_files(entries, NamingConfig("dp1/", None))
    assert [f[NAME] for f in name_files(cols, NamingConfig("", None))[0]] == \
        ["b/x.fits", "a.fits", "b.fits"]


@pytest.mark.parametrize("relpaths", [
    ("a.fits", "b.fits", "a.fits"),     # a hand-edited catalogue: a path twice, apart
    ("a.fits", "a.fits", "b.fits"),     # side by side, in order
])
def test_a_path_twice_is_refused(relpaths: tuple[str, ...]) -> None:
    files, problems = name_files(Columns(list(relpaths), [1, 2, 3], [1.0, 2.0, 3.0]),
                                 NamingConfig("", None))
    assert [f[REL] for f in files] == ["a.fits", "b.fits"]
    assert [p.reason for p in problems] == [
        "gets the same Rucio name 'a.fits' as 'a.fits'; rename one of them or change [naming]"]


# ----------------------------------------------------------------------------- indices
@pytest.mark.parametrize(("indices", "expected"), [
    ([0, 1, 2, 3, 7, 9, 10], "0-3,7,9-10"),
    ([10, 9, 7, 3, 2, 1, 0], "0-3,7,9-10"),
    ([3, 3, 1, 2, 2], "1-3"),
    ([5], "5"),
    ([], ""),
    (range(1000), "0-999"),
    ([0, 2, 4], "0,2,4"),
])
def test_compress_indices(indices: Sequence[int], expected: str) -> None:
    assert compress_indices(indices) == expected


# ----------------------------------------------------------------------------- layout
def test_run_layout(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "R1")
    d = tmp_path / "R1"
    assert layout.dir == d
    assert layout.run_json == d / "run.json"
    assert layout.job_copy == d / "job.toml"
    assert layout.catalogue == d / "catalogue.json"
    assert layout.skipped == d / "skipped.jsonl"
    assert layout.array_script == d / "array.sh"
    assert layout.collect_script == d / "collect.sh"
    assert layout.summary == d / "summary.json"
    assert layout.logs == d / "logs"
    assert layout.manifest(3) == d / "manifests" / "task-00003.json"
    assert layout.result(3) == d / "results" / "task-00003.jsonl"
    assert layout.done_marker(3) == d / "results" / "task-00003.done.json"
    assert layout.manifest(123456) == d / "manifests" / "task-123456.json"
    assert RunLayout(str(d)).dir == d  # type: ignore[arg-type]
