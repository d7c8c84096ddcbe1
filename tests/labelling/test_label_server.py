"""The labelling server (prefl/labelling/server.py): the token rule, loopback Host names only
without a token, JSON-only decisions, texts served as data and shown as text (the browser itself
is in test_label_browser.py), and the real ``prefl label`` process on a non-loopback host."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import HOSTILE, write_samples

from prefl.data.pairs import LabelCounts, read_samples
from prefl.labelling.server import create_app, needs_token, page_url
from prefl.labelling.store import LabelStore

STATIC = Path(__file__).resolve().parents[2] / "prefl" / "labelling" / "static"
ROWS = [{"prompt": "Say something.", "completions": [HOSTILE, "Hello."]},
        {"prompt": "Again.", "completions": ["One.", "Two."]}]  # fmt: skip


@pytest.fixture
def store(tmp_path):
    rows = read_samples([write_samples(tmp_path / "s.jsonl", ROWS)], LabelCounts())
    store = LabelStore(rows, tmp_path / "pairs.jsonl")
    yield store
    store.close()


def test_only_loopback_hosts_go_without_a_token():
    assert [needs_token(h) for h in ("127.0.0.1", "localhost", "::1")] == [False] * 3
    assert [needs_token(h) for h in ("0.0.0.0", "192.168.1.5", "::")] == [True] * 3
    assert page_url("0.0.0.0", 8765, "tok") == "http://0.0.0.0:8765/?token=tok"
    assert page_url("::1", 80, None) == "http://[::1]:80/"


def test_with_a_token_every_request_without_it_gets_403(store):
    client = create_app(store, token="s3cret").test_client()
    for path in ("/", "/static/label.js", "/api/state", "/?token=wrong"):
        assert client.get(path).status_code == 403, path
    assert client.post("/api/decide", json={"id": "x", "decision": "left"}).status_code == 403
    assert store.tally()["decided"] == 0
    assert client.get("/?token=s3cret").status_code == 200
    assert client.get("/static/label.js?token=s3cret").status_code == 200
    assert client.get("/api/state", headers={"X-Prefl-Token": "s3cret"}).status_code == 200
    page = client.get("/?token=s3cret").get_data(as_text=True)
    assert '<meta name="prefl-token" content="s3cret">' in page
    assert 'src="/static/label.js?token=s3cret"' in page


def test_without_a_token_only_loopback_host_names_are_answered(store):
    """DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends its own Host."""
    client = create_app(store).test_client()
    assert client.get("/", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "localhost:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "[::1]:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "evil.example:8765"}).status_code == 403


def test_decisions_are_json_only_and_answered_with_the_next_item(store):
    client = create_app(store).test_client()
    item = store.items[0]
    form = client.post("/api/decide", data={"id": item.id, "decision": "left"})
    assert form.status_code == 400  # a cross-site form cannot post JSON without a preflight
    plain = client.post("/api/decide", data=json.dumps({"id": item.id, "decision": "left"}),
                        content_type="text/plain")  # fmt: skip
    assert plain.status_code == 400 and store.tally()["decided"] == 0
    ok = client.post("/api/decide", json={"id": item.id, "decision": "left"})
    assert ok.status_code == 200
    assert ok.json["item"]["id"] == store.items[1].id and ok.json["decided"] == 1
    again = client.post("/api/decide", json={"id": item.id, "decision": "right"})
    assert again.status_code == 409 and again.json["item"]["id"] == store.items[1].id
    assert client.post("/api/decide", json={"id": "nope", "decision": "left"}).status_code == 404
    assert client.post("/api/decide", json={"id": item.id, "decision": "?"}).status_code == 400
    assert client.post("/api/undo", json={}).json["item"]["id"] == item.id
    assert client.post("/api/undo", json={}).status_code == 409


def test_texts_are_data_and_the_page_never_parses_them_as_html(store):
    client = create_app(store).test_client()
    state = client.get("/api/state")
    assert state.mimetype == "application/json"
    item = state.json["item"]
    assert HOSTILE in (item["left"], item["right"]) and item["prompt"] == "Say something."
    csp = state.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert state.headers["X-Content-Type-Options"] == "nosniff"
    script = (STATIC / "label.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert script.count(".textContent = ") >= 5
    page = client.get("/").get_data(as_text=True)
    assert "<script>" not in page and "style=" not in page  # nothing inline: CSP allows none


def test_the_label_command_on_another_host_needs_the_token(tmp_path):
    """``prefl label --host 0.0.0.0`` prints a URL with a fresh token: 403 without it, 200 with
    it; Ctrl-C (SIGINT) stops it with a summary."""
    samples = write_samples(tmp_path / "s.jsonl", ROWS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "prefl", "label", str(samples), "--out",
            str(tmp_path / "p.jsonl"), "--host", "0.0.0.0", "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    try:
        url = None
        for line in proc.stdout:
            if match := re.search(r"open (http://\S+)", line):
                url = match.group(1)
                break
        assert url is not None, "no URL printed"
        port, token = re.fullmatch(r"http://0\.0\.0\.0:(\d+)/\?token=(\S+)", url).groups()
        assert len(token) >= 32
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{base}/api/state", timeout=30)
        assert denied.value.code == 403
        with urllib.request.urlopen(f"{base}/api/state?token={token}", timeout=30) as ok:
            assert ok.status == 200 and json.load(ok)["total"] == 2
    finally:
        proc.send_signal(2)
        rest = proc.communicate(timeout=60)[0]
    assert "prefl label: 0 of 2 items decided" in rest


def test_ctrl_c_stops_the_label_command_even_when_it_started_with_sigint_ignored(tmp_path):
    """A non-interactive shell's background job starts with SIGINT ignored, which Python keeps;
    ``prefl label`` puts the default handler back, so SIGINT still stops it with a summary."""
    samples = write_samples(tmp_path / "s.jsonl", ROWS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "prefl", "label", str(samples), "--out",
            str(tmp_path / "p.jsonl"), "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        assert any("open http://" in line for line in proc.stdout), "no URL printed"
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "prefl label: 0 of 2 items decided" in rest
