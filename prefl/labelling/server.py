"""``prefl label``: a local web page on which a person labels pairs, with Flask.

Flask (the ``prefl[label]`` extra) because the page needs little: a few JSON routes, a template
and static files, served by a small, mature and widely audited framework rather than by
hand-written HTTP handling. The page (``templates/label.html``, ``static/label.js``) asks
about one item at a time and sends each decision as JSON; the server answers only once the
decision is on disk (:class:`~prefl.labelling.store.LabelStore`), and the page shows the next
item only then.

Security: the server binds ``127.0.0.1`` by default and then answers only requests whose
``Host`` is a loopback name (a web page elsewhere cannot reach it by DNS rebinding). On any
other host every request must carry a random token (the printed URL has it as ``?token=``;
the page sends it back in a header), or gets 403. Decisions are POSTed as
``application/json``, which a page of another origin cannot send without a CORS preflight that
this server never grants. The page shows every text with ``textContent``, never as HTML, under
a Content-Security-Policy that allows no inline or foreign script.
"""

from __future__ import annotations

import hmac
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

from flask import Flask, abort, jsonify, render_template, request
from werkzeug.serving import make_server

from prefl.labelling.store import DECISIONS, LabelStore

LOOPBACK = ("127.0.0.1", "localhost", "::1")
HERE = Path(__file__).resolve().parent
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def needs_token(host: str) -> bool:
    """Whether a server bound to ``host`` asks for the token (any host but a loopback one)."""
    return host not in LOOPBACK


def _state(store: LabelStore) -> dict[str, Any]:
    item = store.next_item()
    shown = None
    if item is not None:
        row = store.rows[item.row]
        shown = {
            "id": item.id,
            "prompt": row.prompt,
            "left": row.completions[item.left],
            "right": row.completions[item.right],
        }
    return {"item": shown, **store.tally()}


def _host_name(host_header: str) -> str:
    """The host name of a ``Host`` header, without its port (``[::1]:80`` gives ``::1``)."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def create_app(store: LabelStore, token: str | None = None) -> Flask:
    """The labelling app over ``store``.

    Args:
        store: Where the decisions go.
        token: The token every request must carry (``?token=`` or the ``X-Prefl-Token``
            header); None = no token, and only loopback ``Host`` names are answered.
    """
    app = Flask(__name__, template_folder=str(HERE / "templates"), static_folder=None)
    static = HERE / "static"

    @app.before_request
    def guard() -> None:
        if token is None:
            if _host_name(request.host) not in LOOPBACK:
                abort(403)
            return
        given = request.headers.get("X-Prefl-Token") or request.args.get("token") or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403)

    @app.after_request
    def headers(response: Any) -> Any:
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"  # the token stays out of Referer
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/")
    def page() -> Any:
        return render_template("label.html", token=token or "")

    @app.get("/static/<name>")
    def asset(name: str) -> Any:
        if name not in {"label.js", "label.css"}:
            abort(404)
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return app.response_class((static / name).read_text(encoding="utf-8"), mimetype=kind)

    @app.get("/api/state")
    def state() -> Any:
        return jsonify(_state(store))

    @app.post("/api/decide")
    def decide() -> Any:
        body = request.get_json(silent=True) if request.is_json else None
        if not isinstance(body, dict) or body.get("decision") not in DECISIONS:
            return jsonify(error=f"expected JSON {{id, decision: one of {list(DECISIONS)}}}"), 400
        try:
            written = store.decide(str(body.get("id")), body["decision"])
        except KeyError:
            return jsonify(error=f"no item {body.get('id')!r}", **_state(store)), 404
        if not written:
            return jsonify(error="already decided (in another tab?)", **_state(store)), 409
        return jsonify(_state(store))

    @app.post("/api/undo")
    def undo() -> Any:
        if not request.is_json:
            return jsonify(error="expected a JSON request"), 400
        if store.undo() is None:
            return jsonify(error="nothing to undo", **_state(store)), 409
        return jsonify(_state(store))

    return app


def page_url(host: str, port: int, token: str | None) -> str:
    """The URL to open (with the token, when there is one)."""
    name = f"[{host}]" if ":" in host else host
    return f"http://{name}:{port}/" + (f"?token={token}" if token else "")


def serve(store: LabelStore, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the page until interrupted (Ctrl-C), printing its URL first (``port`` 0 = any
    free port); on a host other than a loopback one with a fresh random token.

    SIGINT stops it even when the process started with SIGINT ignored (as a non-interactive
    shell's background job does): in the main thread the default handler is put in place while
    it serves, and the previous one put back after."""
    token = secrets.token_urlsafe(24) if needs_token(host) else None
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
    server = make_server(host, port, create_app(store, token), threaded=True)
    tally = store.tally()
    try:  # the print too: a Ctrl-C right after the URL appears (while it flushes) is a stop
        print(
            f"prefl label: {tally['total']} items, {tally['decided']} already decided; open "
            f"{page_url(host, server.server_port, token)}  (Ctrl-C stops; every decision is "
            "on disk as it is made)",
            flush=True,
        )
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
