"""catalogue.walk: patterns, pruning, symlink policies, refused entries; catalogue files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from unit_helpers import write_tree

from dac_upload.catalogue import (
    Catalogue,
    CatalogueFileError,
    Columns,
    Entry,
    Problem,
    read_catalogue,
    walk,
    write_catalogue,
)
from dac_upload.config import SourceConfig


def _source(root: Path, include: tuple[str, ...] = ("**/*",), exclude: tuple[str, ...] = (),
            symlinks: str = "follow") -> SourceConfig:
    return SourceConfig(root=root, include=include, exclude=exclude, symlinks=symlinks)


def _rels(cat: Catalogue) -> list[str]:
    return [e.relpath for e in cat.file_entries()]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write_tree(root, {
        "b.fits": b"0123456789",
        "a.txt": b"text",
        "empty.fits": b"",
        "raw/r1.fits": b"r1",
        "raw/r2.fits": b"r22",
        "raw/deep/d1.fits": b"d",
        "raw/tmp/t.fits": b"t",
        "tmp/x.fits": b"x",
        "tmpx/y.fits": b"y",
        "calib/c.yaml": b"c: 1\n",
    })
    return root


def test_walk_everything_in_deterministic_order(tree: Path) -> None:
    cat = walk(_source(tree))
    # depth first: a directory's own files (by name), then its subdirectories (by name)
    assert _rels(cat) == [
        "a.txt", "b.fits", "empty.fits",
        "calib/c.yaml",
        "raw/r1.fits", "raw/r2.fits", "raw/deep/d1.fits", "raw/tmp/t.fits",
        "tmp/x.fits",
        "tmpx/y.fits",
    ]
    assert cat.refused == [] and cat.skipped == []
    assert cat.root == tree
    assert cat.pattern_hits == {"**/*": 10}
    assert cat.total_bytes == 10 + 4 + 0 + 5 + 2 + 3 + 1 + 1 + 1 + 1
    by_rel = {e.relpath: e for e in cat.file_entries()}
    assert by_rel["empty.fits"].size == 0
    assert by_rel["raw/r2.fits"].size == 3
    st = os.stat(tree / "raw/r2.fits")
    assert by_rel["raw/r2.fits"].mtime == st.st_mtime
    assert walk(_source(tree)) == cat


def test_include_and_exclude(tree: Path) -> None:
    cat = walk(_source(tree, include=("**/*.fits",), exclude=("**/tmp/**", "empty.fits")))
    assert _rels(cat) == ["b.fits", "raw/r1.fits", "raw/r2.fits", "raw/deep/d1.fits",
                          "tmpx/y.fits"]
    # tmp/ and raw/tmp/ are pruned (never entered), so their files are not even counted
    assert cat.pattern_hits == {"**/*.fits": 6}


def test_pattern_hits_per_pattern(tree: Path) -> None:
    cat = walk(_source(tree, include=("*.fits", "raw/**", "**/*.yaml", "nothing/*")))
    assert _rels(cat) == ["b.fits", "empty.fits", "calib/c.yaml", "raw/r1.fits",
                          "raw/r2.fits", "raw/deep/d1.fits", "raw/tmp/t.fits"]
    assert cat.pattern_hits == {"*.fits": 2, "raw/**": 4, "**/*.yaml": 1, "nothing/*": 0}


def test_pattern_hits_count_the_first_matching_pattern(tree: Path) -> None:
    # documented in pipeline.check_catalogue, which looks again before calling a 0 an error
    cat = walk(_source(tree, include=("**/*.fits", "raw/*.fits")))
    assert cat.pattern_hits == {"**/*.fits": 8, "raw/*.fits": 0}
    assert cat.file_count == 8


def test_exclude_file_pattern_does_not_prune(tree: Path) -> None:
    cat = walk(_source(tree, include=("**/*.fits",), exclude=("**/tmp/*",)))
    assert "raw/tmp/t.fits" not in _rels(cat)
    assert "tmp/x.fits" not in _rels(cat)
    assert "tmpx/y.fits" in _rels(cat)


def test_directory_symlink_is_listed_and_not_descended(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_tree(outside, {"o.fits": b"o"})
    os.symlink(outside, tree / "link-out")
    os.symlink(tree / "raw", tree / "calib" / "loop")
    cat = walk(_source(tree))
    assert not any(r.startswith(("link-out", "calib/loop")) for r in _rels(cat))
    assert cat.file_count == 10
    # the root's entries are scanned before calib/'s
    assert cat.skipped == [Problem("link-out", "directory symlink not followed"),
                           Problem("calib/loop", "directory symlink not followed")]
    assert cat.refused == []


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    root = tmp_path / "linked"
    write_tree(root, {"real.fits": b"12345"})
    target = tmp_path / "target.fits"
    target.write_bytes(b"target content")
    os.symlink(target, root / "link.fits")
    return root


def test_file_symlink_followed(linked: Path) -> None:
    cat = walk(_source(linked, symlinks="follow"))
    by_rel = {e.relpath: e for e in cat.file_entries()}
    assert sorted(by_rel) == ["link.fits", "real.fits"]
    assert by_rel["link.fits"].size == len(b"target content")  # the target's size
    assert cat.refused == [] and cat.skipped == []


def test_file_symlink_skipped(linked: Path) -> None:
    cat = walk(_source(linked, symlinks="skip"))
    assert _rels(cat) == ["real.fits"]
    assert cat.skipped == [Problem("link.fits", 'symlink skipped (symlinks = "skip")')]
    assert cat.refused == []


def test_file_symlink_refused(linked: Path) -> None:
    cat = walk(_source(linked, symlinks="refuse"))
    assert _rels(cat) == ["real.fits"]
    assert len(cat.refused) == 1
    assert cat.refused[0].relpath == "link.fits"
    assert 'symlinks = "refuse"' in cat.refused[0].reason
    assert cat.skipped == []


def test_symlink_not_matching_include_is_ignored(linked: Path) -> None:
    cat = walk(_source(linked, include=("real.*",), symlinks="refuse"))
    assert _rels(cat) == ["real.fits"]
    assert cat.refused == [] and cat.skipped == []


def test_dangling_symlink_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_tree(root, {"ok.fits": b"ok"})
    os.symlink(tmp_path / "gone.fits", root / "dangling.fits")
    cat = walk(_source(root))
    assert _rels(cat) == ["ok.fits"]
    assert cat.refused == [Problem("dangling.fits", "dangling symlink")]
    # not matched by include: not reported at all
    assert walk(_source(root, include=("ok.*",))).refused == []


def test_fifo_refused(tmp_path: Path) -> None:
    root = tmp_path / "f"
    write_tree(root, {"ok.fits": b"ok"})
    os.mkfifo(root / "pipe.fits")
    os.mkfifo(root / "pipe.txt")
    cat = walk(_source(root, include=("*.fits",)))
    assert _rels(cat) == ["ok.fits"]
    assert cat.refused == [Problem("pipe.fits", "not a regular file")]


def test_non_utf8_name_refused(tmp_path: Path) -> None:
    root = tmp_path / "n"
    write_tree(root, {"ok.fits": b"ok"})
    fd = os.open(os.path.join(os.fsencode(root), b"bad\xff.fits"), os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    cat = walk(_source(root, include=("*.fits",)))
    assert _rels(cat) == ["ok.fits"]
    assert cat.refused == [Problem("bad\ufffd.fits", "the file name is not valid UTF-8")]
    # excluded: not reported
    assert walk(_source(root, include=("ok.*",))).refused == []


def test_unreadable_file_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file: permissions cannot make one unreadable")
    root = tmp_path / "u"
    write_tree(root, {"ok.fits": b"ok", "secret.fits": b"s"})
    (root / "secret.fits").chmod(0)
    cat = walk(_source(root))
    assert _rels(cat) == ["ok.fits"]
    assert [p.relpath for p in cat.refused] == ["secret.fits"]
    assert "not readable" in cat.refused[0].reason


def test_empty_root(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    cat = walk(_source(tmp_path / "e", include=("*.fits",)))
    assert cat.file_entries() == [] and cat.total_bytes == 0
    assert cat.pattern_hits == {"*.fits": 0}


def test_missing_root_is_refused_not_raised(tmp_path: Path) -> None:
    cat = walk(_source(tmp_path / "missing"))
    assert cat.file_entries() == []
    assert len(cat.refused) == 1 and cat.refused[0].relpath == "."
    assert cat.refused[0].reason.startswith("cannot list directory: ")


class _Recorder:
    def __init__(self) -> None:
        self.updates: list[tuple[int, int]] = []
        self.finished = False

    def update(self, files: int, nbytes: int) -> None:
        self.updates.append((files, nbytes))

    def done(self) -> None:
        self.finished = True


def test_progress_is_told_running_totals(tree: Path) -> None:
    rec = _Recorder()
    cat = walk(_source(tree, include=("raw/*.fits",)), progress=rec)  # type: ignore[arg-type]
    # once per directory with files (the running totals), here raw/ the only one that counts
    assert rec.updates[-1] == (2, 5) and (1, 2) not in rec.updates
    assert rec.finished
    assert cat.total_bytes == 5


# ----------------------------------------------------------------------------- catalogue file
def _job_source(root: Path) -> SourceConfig:
    return SourceConfig(root=root, include=("**/*",), exclude=(), symlinks="follow")


def test_catalogue_round_trip(tmp_path: Path, tree: Path) -> None:
    cat = walk(_source(tree))
    cat.columns.add("ünïcode/naïve name.fits", 12345678901, 1700000000.123456789)
    cat.skipped.append(Problem("dirlink", "directory symlink not followed"))
    cat.outside_targets.add("/elsewhere")
    path = tmp_path / "catalogue.json"
    digest = write_catalogue(path, cat, _job_source(tree), "2026-11-25T00:00:00Z", "t 1")
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    back, header = read_catalogue(path)
    assert back.file_entries() == cat.file_entries() and back.root == cat.root
    assert back.files() == cat.files() and back.total_bytes == cat.total_bytes
    assert back.file_count == cat.file_count == len(cat.file_entries())
    assert back.skipped == cat.skipped and back.outside_targets == {"/elsewhere"}
    assert back.pattern_hits == cat.pattern_hits
    assert header["source"] == {"root": str(tree), "include": ["**/*"], "exclude": [],
                                "symlinks": "follow"}
    assert (header["files"], header["bytes"]) == (cat.file_count, cat.total_bytes)
    doc = json.loads(path.read_text(encoding="utf-8"))   # plain JSON, three columns
    assert doc["relpath"][-1] == "ünïcode/naïve name.fits"
    assert (doc["size"][-1], doc["mtime"][-1]) == (12345678901, 1700000000.1234567)


def test_empty_catalogue_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write_catalogue(path, Catalogue(root=tmp_path), _job_source(tmp_path), "now", "t")
    cat, header = read_catalogue(path)
    assert cat.file_entries() == [] and header["files"] == 0 and cat.total_bytes == 0


@pytest.mark.parametrize("content, says", [
    (None, "cannot read the catalogue"),
    (b"{not json", "not JSON"),
    (b'{"relpath": []}', "not a catalogue written by dac-upload catalogue"),
    (b"[1, 2]", "not a catalogue written by dac-upload catalogue"),
])
def test_unreadable_catalogue_files_say_so_in_one_line(tmp_path: Path, content: bytes | None,
                                                      says: str) -> None:
    path = tmp_path / "c.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CatalogueFileError) as exc:
        read_catalogue(path)
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_damaged_catalogue_is_refused(tmp_path: Path, tree: Path) -> None:
    path = tmp_path / "c.json"
    write_catalogue(path, walk(_source(tree)), _job_source(tree), "now", "t")
    doc = json.loads(path.read_text())
    doc["size"] = doc["size"][:-1]                      # a column cut short
    path.write_text(json.dumps(doc))
    with pytest.raises(CatalogueFileError, match="damaged catalogue"):
        read_catalogue(path)


def test_catalogue_text_is_one_json_document_and_the_same_bytes_again(tmp_path: Path) -> None:
    """Streamed in chunks of 65,536 files, the text is the whole document (floats exactly);
    the same catalogue, read back and written again, gives the same bytes."""
    entries = [Entry(f'd{i % 7}/quo"te\\ü {i}.fits', i * 3, 1700000000.123456789 + i)
               for i in range(70_000)]
    cat = Catalogue(root=tmp_path, columns=Columns.of(entries), pattern_hits={"**/*": 70_000},
                    skipped=[Problem("l", "directory symlink not followed")])
    path = tmp_path / "c.json"
    write_catalogue(path, cat, _job_source(tmp_path), "now", "t")
    doc = {"dac_upload_catalogue": 1, "created_at": "now", "tool": "t",
           "source": {"root": str(tmp_path), "include": ["**/*"], "exclude": [],
                      "symlinks": "follow"},
           "files": 70_000, "bytes": cat.total_bytes,
           "skipped": [{"relpath": "l", "reason": "directory symlink not followed"}],
           "outside_targets": [], "pattern_hits": {"**/*": 70_000},
           "relpath": [e.relpath for e in entries], "size": [e.size for e in entries],
           "mtime": [e.mtime for e in entries]}
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == doc and text.endswith("}\n") and text.count("\n") == 1
    assert text.startswith(json.dumps(doc, sort_keys=True, ensure_ascii=False)[:40])
    back, _ = read_catalogue(path)   # held as columns: written again, the same text
    again = tmp_path / "again.json"
    write_catalogue(again, back, _job_source(tmp_path), "now", "t")
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("edit, says", [
    ({"relpath": ["/etc/hostname"]}, "'/etc/hostname' is not a plain path"),
    ({"relpath": ["sub/../../secret.txt"]}, "'sub/../../secret.txt' is not a plain path"),
    ({"relpath": ["./a.fits"]}, "'./a.fits' is not a plain path"),
    ({"relpath": ["a//b.fits"]}, "'a//b.fits' is not a plain path"),
    ({"relpath": ["dir/"]}, "'dir/' is not a plain path"),
    ({"relpath": [""]}, "'' is not a plain path"),
    ({"relpath": ["a\x00b"]}, "is not a plain path"),
    ({"relpath": ["a\udc80.fits"]}, "is not a plain path"),
    ({"size": [-5]}, "damaged catalogue"),
    ({"size": [6]}, "damaged catalogue"),                  # bytes says 5
    ({"mtime": [10**400]}, "damaged catalogue"),
])
def test_hand_edited_catalogue_is_refused(tmp_path: Path, edit: dict, says: str) -> None:
    """The worker reads ROOT/relpath: a catalogue edited by hand must not lead it outside the
    root, nor carry sizes or mtimes that cannot be a file's."""
    path = tmp_path / "c.json"
    cat = Catalogue(root=tmp_path, columns=Columns.of([Entry("a.fits", 5, 1700000000.5)]))
    write_catalogue(path, cat, _job_source(tmp_path), "now", "t")
    doc = json.loads(path.read_text())
    doc.update(edit)
    path.write_text(json.dumps(doc))
    with pytest.raises(CatalogueFileError) as exc:
        read_catalogue(path)
    assert says in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("include", [("**/*",), ("**/*.fits",), ("raw/*.fits",), ("**",)])
def test_whole_directory_and_file_by_file_walks_agree(tmp_path: Path,
                                                      include: tuple[str, ...]) -> None:
    """One include pattern and no exclude takes a directory whole (C loops); a second
    pattern that matches nothing sends every directory file by file: the same catalogue."""
    root = tmp_path / "t"
    write_tree(root, {"a.fits": b"1", ".hidden.fits": b"22", "b.txt": b"333",
                      "raw/r.fits": b"4444", "raw/.h/x.fits": b"5", "raw/s.fitsx": b"66",
                      ".dot/d.fits": b"7", "raw/deep/q.fits": b"88", "raw/deep/w.txt": b"9"})
    os.symlink(root / "a.fits", root / "raw" / "link.fits")   # that directory: file by file
    whole = walk(_source(root, include=include))
    single = walk(_source(root, include=(*include, "no/such/*")))
    assert whole.file_entries() == single.file_entries() and whole.file_entries()
    assert (whole.refused, whole.skipped) == (single.refused, single.skipped)
    assert whole.pattern_hits[include[0]] == single.pattern_hits[include[0]]


def test_helper_processes_give_the_same_catalogue(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Directories listed by helper processes (from the first entry on, here) or by the walk
    itself: the same files, refusals and skipped entries, in the same order."""
    import dac_upload.catalogue as catalogue_mod

    root = tmp_path / "t"
    files = {f"d{i}/sub{j}/f{k}.fits": b"x" * k for i in range(4) for j in range(3)
             for k in range(5)}
    files.update({"top.fits": b"1", "d1/.hidden/h.fits": b"2", "d2/n.txt": b"3"})
    write_tree(root, files)
    os.symlink(root / "top.fits", root / "d0" / "link.fits")
    os.symlink(root / "d1", root / "d2" / "dirlink")
    os.symlink(root / "gone", root / "d3" / "dangling.fits")
    os.mkfifo(root / "d1" / "fifo.fits")
    used = []
    close = catalogue_mod._Helpers.close

    def spy(self: catalogue_mod._Helpers) -> None:
        used.append(len(self.ahead) if self.pool is not None else None)
        close(self)

    monkeypatch.setattr(catalogue_mod._Helpers, "close", spy)
    for include in [("**/*.fits",), ("**/*", "d1/**")]:
        alone = walk(_source(root, include=include))
        monkeypatch.setattr(catalogue_mod, "POOL_AFTER", 0)
        helped = walk(SourceConfig(root=root, include=include, exclude=(), symlinks="follow",
                                   walkers=2))
        monkeypatch.setattr(catalogue_mod, "POOL_AFTER", 10**9)
        assert helped == alone and alone.file_count > 60
        assert {p.reason for p in alone.refused} == {"dangling symlink", "not a regular file"}
        assert [p.relpath for p in alone.skipped] == ["d2/dirlink"]
    if len(os.sched_getaffinity(0)) > 1:   # the helpers did list (nothing left unread)
        assert used == [None, 0, None, 0]


def test_a_symlink_after_regular_files_of_its_directory_is_followed(tmp_path: Path) -> None:
    """File by file, each entry is looked at under its own directory, whatever came before
    it (a symlink after regular files, and a regular file after it)."""
    root = tmp_path / "t"
    write_tree(root, {"a.fits": b"1", "c.fits": b"333", "sub/x.fits": b"22"})
    os.symlink(root / "sub" / "x.fits", root / "b.fits")
    cat = walk(_source(root))
    assert [(e.relpath, e.size) for e in cat.file_entries()] == [
        ("a.fits", 1), ("b.fits", 2), ("c.fits", 3), ("sub/x.fits", 2)]
    assert cat.refused == []
