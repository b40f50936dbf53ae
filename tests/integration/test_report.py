"""dac-upload report in a real browser: a run with failures made by the real tool (Slurm,
Rucio on the posix stack; the page does not depend on the stack), its page written as the
run's owner, then loaded by headless Chromium through chromedriver's WebDriver API: it must
render (a screenshot that is not blank), log nothing to the console, request nothing but
itself, and hold the run's tasks and failed files. The browser check is shown to catch a
page with a script error, a missing resource or an external load."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest
from ithelpers import (
    VENV_BIN,
    as_user,
    dac_upload,
    job_toml,
    parse_submitted,
    run_dir_of,
    unique_prefix,
    wait_for_jobs,
    write_job,
)

from dac_upload.files import read_manifest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOT = Path("/tmp/drafts/report.png")        # kept for a person to look at
HOSTILE = """we<i>rd & "q" 'x'.dat"""          # a source file name, as users have them


# ---------------------------------------------------------------- the browser
class Browser:
    """Headless Chromium driven over chromedriver's WebDriver HTTP API (urllib only), with
    the browser's console log and the DevTools network events recorded."""

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
            why = "no chromium / chromedriver (apt-get install chromium chromium-driver)"
            if os.environ.get("CI"):   # tests/services/install.sh installs both
                pytest.fail(f"{why}: CI must run the browser test")
            pytest.skip(why)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.driver = subprocess.Popen([str(CHROMEDRIVER), f"--port={port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.session: str | None = None
        self.width = width
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    self._call("GET", "/status")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            args = ["--headless=new", "--disable-gpu", f"--window-size={width},{height}",
                    "--hide-scrollbars", "--no-first-run", "--disable-extensions"]
            if os.geteuid() == 0:
                args.append("--no-sandbox")   # Chromium's sandbox refuses root
            caps = {"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": str(CHROMIUM), "args": args},
                "goog:loggingPrefs": {"browser": "ALL", "performance": "ALL"}}}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"WebDriver {method} {path}: {exc.read()[:500]!r}") from None

    def _s(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def load(self, page: Path) -> dict[str, Any]:
        """Open the file and say what happened: the console's messages, every URL the page
        requested, and the screenshot of the first screen (PNG bytes)."""
        self._s("POST", "/se/log", {"type": "browser"})          # empty both logs first
        self._s("POST", "/se/log", {"type": "performance"})
        self._s("POST", "/url", {"url": page.resolve().as_uri()})
        self.js("return document.readyState")                     # the load is over
        console = self._s("POST", "/se/log", {"type": "browser"})
        requests = []
        for entry in self._s("POST", "/se/log", {"type": "performance"}):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                requests.append(msg["params"]["request"]["url"])
        return {"console": console, "requests": requests,
                "png": base64.b64decode(self._s("GET", "/screenshot"))}

    def js(self, script: str) -> Any:
        return self._s("POST", "/execute/sync", {"script": script, "args": []})

    def full_page_png(self) -> bytes:
        height = int(self.js("return document.documentElement.scrollHeight"))
        self._s("POST", "/window/rect", {"width": self.width, "height": height + 140})
        return base64.b64decode(self._s("GET", "/screenshot"))

    def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(OSError, AssertionError):
                self._s("DELETE", "")
            self.session = None
        self.driver.terminate()
        try:
            self.driver.wait(10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
            self.driver.wait()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def problems_of(seen: dict[str, Any], page: Path) -> list[str]:
    """What is wrong with a page as loaded: console messages of warning level or worse
    (script errors, CSP refusals, resources that failed), and requests for anything but
    the page itself."""
    out = [f"console {e['level']}: {e['message']}" for e in seen["console"]
           if e["level"] in ("SEVERE", "WARNING")]
    out += [f"request: {url}" for url in seen["requests"] if url != page.resolve().as_uri()]
    return out


def png_pixels(png: bytes) -> tuple[int, int, int]:
    """(width, height, pixels that are not white nor near it) of an 8-bit RGB(A) PNG, by
    the standard library: the chunks, zlib, and the five row filters undone."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        chunk = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    ink = 0
    for y in range(height):
        row = y * (stride + 1)
        kind, line = raw[row], bytearray(raw[row + 1:row + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        ink += sum(1 for x in range(0, stride, bpp) if min(line[x:x + 3]) < 235)
        prev = line
    return width, height, ink


# ---------------------------------------------------------------- the browser check itself
PAGE_OK = ("<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv="
           "'Content-Security-Policy' content=\"default-src 'none'; style-src "
           "'unsafe-inline'; img-src data:\"></head><body>{}</body></html>")
PAGE_NO_CSP = "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{}</body></html>"


@pytest.mark.parametrize("page, expected", [
    (PAGE_NO_CSP.format("<p>x</p><script>no_such_function()</script>"),
     "Uncaught ReferenceError"),
    (PAGE_NO_CSP.format("<link rel='stylesheet' href='missing.css'><p>x</p>"),
     "ERR_FILE_NOT_FOUND"),
    (PAGE_OK.format("<p>x</p><img src='http://127.0.0.1:9/logo.png'>"),
     "Content Security Policy"),
    (PAGE_OK.format("<p>x</p><script>1</script>"), "Content Security Policy"),
])
def test_the_browser_check_catches_a_broken_page(tmp_path: Path, page: str,
                                                 expected: str) -> None:
    """Each way a page can go wrong is caught: the checks below cannot pass by default."""
    path = tmp_path / "broken.html"
    path.write_text(page)
    good = tmp_path / "good.html"
    good.write_text(PAGE_OK.format("<p>fine</p>"))
    with Browser() as browser:
        assert problems_of(browser.load(good), good) == []
        found = problems_of(browser.load(path), path)
    assert any(expected in line for line in found), found


def test_the_pixel_count_tells_a_blank_screen(tmp_path: Path) -> None:
    blank, text = tmp_path / "blank.html", tmp_path / "text.html"
    blank.write_text(PAGE_OK.format(""))
    text.write_text(PAGE_OK.format("<h1 style='font-size:80px'>dac-upload</h1>"))
    with Browser(width=640, height=400) as browser:
        w, h, none = png_pixels(browser.load(blank)["png"])
        _, _, some = png_pixels(browser.load(text)["png"])
    assert (w, none) == (640, 0) and h > 200   # the window less its frame
    assert some > 2000


# ---------------------------------------------------------------- a real run's page
def make_files(root: Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"file{i:02d}.dat").write_bytes(bytes([i]) * (20_000 + 5_000 * i))
    (root / HOSTILE).write_bytes(b"hostile" * 1000)


def test_report_of_a_run_with_failures_in_a_browser(workdir: Path, posix_stack: Any) -> None:
    make_files(workdir / "src", 11)            # 12 files: 3 tasks of 4, one at a time
    text = job_toml(unique_prefix(), include="**/*.dat", max_running=1)
    job = write_job(workdir, "report", text.replace(
        "[naming]\n", '[naming]\nreplace_invalid = "_"\n'))   # the name made valid
    planned = dac_upload(["plan", str(job)], cwd=workdir)
    assert planned.returncode == 0, planned.stderr
    run_dir = run_dir_of(planned.stdout)
    manifests = [read_manifest(run_dir / "manifests" / f"task-{t:05d}.json")["files"]
                 for t in range(3)]
    where = {e["relpath"]: t for t, files in enumerate(manifests) for e in files}
    hostile_task = where[HOSTILE]
    # after planning: the hostile file unreadable, another task's file gone
    (workdir / "src" / HOSTILE).chmod(0)
    gone = next(rel for rel, t in where.items() if t != hostile_task)
    (workdir / "src" / gone).unlink()
    never = next(t for t in range(3) if t not in (hostile_task, where[gone]))

    submitted = dac_upload(["submit", "--run", str(run_dir)], cwd=workdir)
    assert submitted.returncode == 0, submitted.stderr
    array_id, collector_id = parse_submitted(submitted.stdout)
    subprocess.run(["scancel", f"{array_id}_{never}"], check=True)   # still pending: %1
    wait_for_jobs([array_id, collector_id])
    again = dac_upload(["resubmit", str(run_dir), "--retry-permanent", "--wait",
                        "--timeout", "600"], cwd=workdir)
    assert again.returncode == 1, again.stdout + again.stderr   # the two files fail again

    made = as_user([str(VENV_BIN / "python"), "-c",
                    "import sys; from pathlib import Path; from dac_upload.report import "
                    "write_report; print(write_report(Path(sys.argv[1])))", str(run_dir)],
                   cwd=workdir)
    assert made.returncode == 0, made.stderr
    page = Path(made.stdout.strip())
    assert page == run_dir / "report.html" and page.stat().st_size > 10_000

    with Browser() as browser:
        seen = browser.load(page)
        assert problems_of(seen, page) == []
        assert seen["requests"] == [page.resolve().as_uri()]
        width, height, ink = png_pixels(seen["png"])
        assert width == 1280
        assert ink > 0.02 * width * height, ink     # text, cards, charts: not blank
        dom = browser.js("""
            const text = (sel) => Array.from(document.querySelectorAll(sel),
                                             (e) => e.textContent.trim());
            const box = (sel) => document.querySelector(sel).getBoundingClientRect();
            return {run: text('#run-id'), tasks: text('#tasks tbody tr td:first-child'),
                    states: text('#tasks tbody tr td:nth-child(2)'),
                    attempts: text('#tasks tbody tr td:nth-child(3)'),
                    failed: text('#failed tbody tr td:nth-child(3)'),
                    causes: text('#causes tbody tr td:first-child b'),
                    bars: Array.from(document.querySelectorAll('#timeline rect.bar'),
                                     (e) => e.classList[1]),
                    timeline: box('#timeline').height,
                    bytes: box('#bytes-per-task').height,
                    scripts: document.scripts.length};
        """)
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        SHOT.write_bytes(browser.full_page_png())
    assert dom["run"] == [run_dir.name]
    assert dom["tasks"] == ["0", "1", "2"]
    states = dict(zip(map(int, dom["tasks"]), dom["states"]))
    assert states == {hostile_task: "failed", where[gone]: "failed", never: "done"}
    attempts = dict(zip(map(int, dom["tasks"]), dom["attempts"]))
    assert attempts == {hostile_task: "2", where[gone]: "2", never: "1"}
    # the failing tasks' two attempts each finished (exit 1), the never-run one's did all
    assert sorted(dom["bars"]) == ["failed"] * 4 + ["ok"]
    assert sorted(dom["failed"]) == sorted([HOSTILE, gone])   # the name as it is, not HTML
    assert sorted(dom["causes"]) == ["missing", "unreadable"]
    assert dom["timeline"] > 80 and dom["bytes"] > 80 and dom["scripts"] == 0
    html = page.read_text()
    assert "we<i>rd" not in html and "we&lt;i&gt;rd &amp; &#34;q&#34; &#39;x&#39;.dat" in html
    shutil.copy(page, SHOT.with_suffix(".html"))
