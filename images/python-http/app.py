"""python-http: a tiny JSON API whose state lives only in memory.

    python3 app.py [PORT]      (default 80, on 0.0.0.0)

GET /        -> {"hits": N, "items": [...]}   (N counts the GET / requests so far)
GET /items   -> [...]
POST /items  -> appends the request body (parsed as JSON if it is JSON, else as text)
                and answers 201 {"index": i, "item": ...}

It serves one request at a time (http.server's single-threaded HTTPServer) and closes each
connection after its response, so that no idle client can hold the only thread. SIGTERM
ends it with status 0.
"""

import json
import os
import selectors
import signal
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

MAX_BODY = 1 << 20

STATE = {"hits": 0, "items": []}


class Stop(BaseException):
    """Raised by the SIGTERM handler. A BaseException, so that the server's per-request
    error handling (which catches Exception) lets it through to serve_forever's caller."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "picocenter-python-http/1"

    def send_json(self, status, value):
        body = (json.dumps(value) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        if self.path == "/":
            STATE["hits"] += 1
            self.send_json(200, STATE)
        elif self.path == "/items":
            self.send_json(200, STATE["items"])
        else:
            self.send_json(404, {"error": "not found"})

    def do_HEAD(self):
        self.do_GET()

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.send_json(400 if length < 0 else 413, {"error": "bad Content-Length"})
            return
        body = self.rfile.read(length)
        if self.path != "/items":
            self.send_json(404, {"error": "not found"})
            return
        text = body.decode("utf-8", errors="replace")
        try:
            item = json.loads(text)
        except ValueError:
            item = text
        STATE["items"].append(item)
        self.send_json(201, {"index": len(STATE["items"]) - 1, "item": item})

    def log_message(self, format, *args):
        sys.stderr.write("python-http: %s %s\n" % (self.address_string(), format % args))


def on_term(signum, frame):
    raise Stop()


def serve_until_signalled(server):
    """Serves requests until a signal handler raises. Like serve_forever with no poll
    interval (the app sleeps until a request or a signal arrives), but a signal that comes
    after Python last checked for signals and before the poll starts still wakes the poll:
    Python's C handler writes its number into a pipe the poll watches (set_wakeup_fd).
    Without it such a SIGTERM waits for the next request."""
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    with selectors.PollSelector() as selector:
        selector.register(server, selectors.EVENT_READ)
        selector.register(wake_read, selectors.EVENT_READ)
        while True:
            # A handler that raises ends select (PEP 475 runs handlers before a retry).
            for key, _ in selector.select():
                if key.fileobj == wake_read:
                    try:
                        os.read(wake_read, 64)
                    except BlockingIOError:
                        pass
                else:
                    server._handle_request_noblock()


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    signal.signal(signal.SIGTERM, on_term)
    server = HTTPServer(("0.0.0.0", port), Handler)
    sys.stderr.write("python-http: listening on 0.0.0.0:%d\n" % port)
    try:
        serve_until_signalled(server)
    except (Stop, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
    sys.stderr.write("python-http: stopping after %d hits\n" % STATE["hits"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
