"""A read-only HTTP server for the round reports of one store, so the Prefect UI's links open in a browser.

The stack starts it on 127.0.0.1 (`python -m tasks.publish.report_server --store URL --port P`) and tells flow
runs its address (SELFINSTRUCT_REPORT_URL); each round's link artifact then points at
`<report url>/rounds/round=NNNNN/report.html`. It serves exactly those files and an index of the committed
rounds, read through the Store, so a local folder and an S3 store work the same way.
"""

import argparse
import contextlib
import html
import re
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tasks.publish.report import REPORT_FILE, report_path
from tasks.resources.redact import redact_url
from tasks.resources.store.files import StoreError
from tasks.resources.store.rounds import Store

_REPORT_PATH = re.compile(r"^/rounds/round=(\d{5})/report\.html$")


def index_page(store: Store) -> str:
    """An HTML list of the committed rounds with links to their reports."""
    rows = "".join(
        f'<li><a href="{report_path(n)}">round {n}</a></li>' for n in reversed(store.committed_rounds())
    )
    title = html.escape(f"Round reports of {redact_url(store.url)}")
    return f"<!doctype html><title>{title}</title><h1>{title}</h1><ul>{rows or '<li>none yet</li>'}</ul>"


def read_report(store: Store, path: str) -> bytes | None:
    """The report at URL `path`, or None when the path is not a committed round's report."""
    match = _REPORT_PATH.match(path)
    if match is None:
        return None
    number = int(match.group(1))
    if number < 1 or number not in store.committed_rounds():
        return None
    return store.read_bytes(number, REPORT_FILE)


def make_handler(store: Store) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `store`."""

    class ReportHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/health":
                    self._send(HTTPStatus.OK, b"ok", "text/plain")
                elif path in ("/", "/index.html"):
                    self._send(HTTPStatus.OK, index_page(store).encode(), "text/html")
                elif (page := read_report(store, path)) is not None:
                    self._send(HTTPStatus.OK, page, "text/html")
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"no such report", "text/plain")
            except (StoreError, OSError) as error:
                message = f"store unavailable: {type(error).__name__}"
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, message.encode(), "text/plain")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", f"{content_type}; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            # The page embeds model output (escaped); forbid scripts anyway.
            policy = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
            self.send_header("Content-Security-Policy", policy)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # access logs add nothing to the stack's log

    return ReportHandler


def serve(store: Store, host: str, port: int) -> None:
    """Serve the store's reports until interrupted."""
    server = ThreadingHTTPServer((host, port), make_handler(store))
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    """`python -m tasks.publish.report_server --store URL [--host H] [--port P]`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True, help="Store root URL.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    args = parser.parse_args(argv)
    from schemas import Settings

    with contextlib.suppress(KeyboardInterrupt):
        serve(Store(args.store, Settings()), args.host, args.port)


if __name__ == "__main__":
    main()
