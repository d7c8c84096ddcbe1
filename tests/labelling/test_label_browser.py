"""The labelling page in a real headless browser (Debian's chromium, driven by Playwright's
Python package; Playwright's own browser download is never used): load it, take a screenshot,
label three items by keyboard, undo one, kill the server (SIGKILL) and start it again, then check
the pairs file. A completion holding ``<script>`` is shown as those characters and never runs.

Skips, saying why, where ``/usr/bin/chromium`` or the ``playwright`` package is absent (CI
installs both: ``apt-get install chromium chromium-driver`` and the ``dev`` extra).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HOSTILE, write_samples

CHROMIUM = os.environ.get("PREFL_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello <b>bold</b>."},
]
ROWS = [
    {"id": "x", "prompt": CHAT, "completions": [HOSTILE, "Hello!"]},
    {"id": "y", "prompt": CHAT, "completions": ["Hi.", "Go away."]},
    {"id": "z", "prompt": CHAT, "completions": ["Hey there.", "Greetings, human."]},
    {"id": "w", "prompt": CHAT, "completions": ["Yo.", "Good day to you."]},
]


def start(samples: Path, out: Path) -> tuple[subprocess.Popen, str]:
    """``prefl label`` as a real process on a free port; returns it and the URL it prints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefl", "label", str(samples), "--out", str(out), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    for line in proc.stdout:
        if match := re.search(r"open (http://127\.0\.0\.1:\d+/)", line):
            return proc, match.group(1)
    proc.kill()
    raise AssertionError(f"prefl label printed no URL: {proc.communicate()[0]}")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file() and shutil.which(CHROMIUM) is None:
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium chromium-driver)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


def shown(page) -> dict:
    """What the page shows: progress, the prompt's turns, the two answers (as text)."""
    return page.evaluate(
        """() => ({
            progress: document.getElementById("progress").textContent,
            roles: [...document.querySelectorAll("#prompt .role")].map(e => e.textContent),
            turns: [...document.querySelectorAll("#prompt .text")].map(e => e.textContent),
            left: document.getElementById("left-text").textContent,
            right: document.getElementById("right-text").textContent,
            pwned: window.__pwned === undefined ? null : window.__pwned,
            scripts: document.querySelectorAll("script").length,
        })"""
    )


def press(page, key: str, progress: str) -> None:
    page.keyboard.press(key)
    page.wait_for_function(
        "p => document.getElementById('progress').textContent === p", arg=progress, timeout=30_000
    )


def test_label_by_keyboard_undo_kill_and_resume(browser, tmp_path):
    samples = write_samples(tmp_path / "samples.jsonl", ROWS)
    out = tmp_path / "pairs.jsonl"
    proc, url = start(samples, out)
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        page.wait_for_function("document.getElementById('progress').textContent === '1 of 4'")
        page.screenshot(path=str(tmp_path / "label.png"), full_page=True)
        first = shown(page)
        assert first["roles"] == ["system", "user"]
        assert first["turns"] == ["You are terse.", "Say hello <b>bold</b>."]
        assert {first["left"], first["right"]} == {HOSTILE, "Hello!"}  # the characters, as text
        assert first["pwned"] is None and first["scripts"] == 1  # nothing ran, nothing added
        assert page.locator("#prompt b").count() == 0
        press(page, "ArrowLeft", "2 of 4")
        second = shown(page)
        press(page, "ArrowRight", "3 of 4")
        press(page, "t", "4 of 4")
        press(page, "u", "3 of 4")  # the tie is taken back
        assert shown(page)["left"] in ("Hey there.", "Greetings, human.")
        assert errors == []
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean shutdown: only what is on disk survives
        proc.wait(timeout=60)
    journal = [json.loads(x) for x in Path(f"{out}.journal").read_text().splitlines()]
    assert [r.get("decision", "undo") for r in journal] == ["left", "right", "tie", "undo"]
    proc, url = start(samples, out)
    try:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('progress').textContent === '3 of 4'")
        assert shown(page)["left"] in ("Hey there.", "Greetings, human.")  # resumed here
    finally:
        proc.send_signal(signal.SIGINT)
        tail = proc.communicate(timeout=60)[0]
    assert "prefl label: 2 of 4 items decided: 2 pairs, 0 ties, 0 skipped" in tail
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert pairs == [
        {"prompt": CHAT, "chosen": [{"role": "assistant", "content": first["left"]}],
         "rejected": [{"role": "assistant", "content": first["right"]}], "margin": 0.0,
         "source": "human", "id": "x/0-1", "left": journal[0]["left"],
         "right": journal[0]["right"], "chosen_side": "left"},
        {"prompt": CHAT, "chosen": [{"role": "assistant", "content": second["right"]}],
         "rejected": [{"role": "assistant", "content": second["left"]}], "margin": 0.0,
         "source": "human", "id": "y/0-1", "left": journal[1]["left"],
         "right": journal[1]["right"], "chosen_side": "right"},
    ]  # fmt: skip
    assert (tmp_path / "label.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
