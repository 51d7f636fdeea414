#!/usr/bin/env python3
"""A small web app that runs beside tandem on every web server.

Standard library only. One instance per web server, next to that server's
tandem. It reads pages straight from tandem's cache directory (as files),
writes them through tandem's HTTP API, keeps rendered pages in memory and
drops them when tandem's event stream says they changed.

Configuration (environment):

  APP_PORT          port to listen on (127.0.0.1), default 8080
  APP_NAME          this server's name, shown in the footer and X-Served-By (default: the hostname)
  TANDEM_URL        the local tandem, default http://127.0.0.1:7411
  TANDEM_CACHE_DIR  tandem's cache_dir (default <data_dir>/cache); unset or missing: read over HTTP
  TANDEM_TOKEN      bearer token for writes, when tandem has api.token_file
                    (or TANDEM_TOKEN_FILE: a file holding it)
  APP_BIND          address to listen on, default 127.0.0.1
  APP_PIDFILE       write the process id here (also: --pidfile FILE)

Routes: GET / and GET /page/<key> (the page), POST /page/<key> (change it,
form field "body" or the raw request body), DELETE /page/<key>, GET /readyz
(tandem's /readyz), GET /events-seen (the last events from tandem).
"""

import collections
import datetime
import html
import json
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CACHE = "pages"  # the tandem cache holding the pages
HOME = "home"  # the key GET / shows

APP_NAME = os.environ.get("APP_NAME") or socket.gethostname()
APP_PORT = int(os.environ.get("APP_PORT", "8080"))
APP_BIND = os.environ.get("APP_BIND", "127.0.0.1")
TANDEM_URL = os.environ.get("TANDEM_URL", "http://127.0.0.1:7411").rstrip("/")
CACHE_DIR = os.environ.get("TANDEM_CACHE_DIR", "")
EVENTS_READ_TIMEOUT = float(os.environ.get("APP_EVENTS_READ_TIMEOUT", "60"))


def _token():
    token = os.environ.get("TANDEM_TOKEN", "").strip()
    path = os.environ.get("TANDEM_TOKEN_FILE", "")
    if not token and path:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    return token


TOKEN = _token()


def log(msg):
    now = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{now} [{APP_NAME}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# Reading the cache directory (docs/api.md, "The key encoding")


def key_path(cache_dir, cache, key):
    """The file of `key` in `cache`: percent-encode everything but
    A-Z a-z 0-9 - _ ~ (also '.'), upper-case hex; '+/' every 240 chars."""
    encoded = urllib.parse.quote(key, safe="").replace(".", "%2E")
    encoded = re.sub(r"(.{240})(?=.)", r"\1+/", encoded)
    return os.path.join(cache_dir, cache, encoded)


def file_signature(st):
    """Changes whenever tandem replaces the file (a new inode each time)."""
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class Missing(Exception):
    pass


def read_from_disk(key):
    """(value bytes, content type, signature), or raises Missing."""
    path = key_path(CACHE_DIR, CACHE, key)
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise Missing(key)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a long key's segment directory
            raise Missing(key)
        try:
            ctype = os.getxattr(fd, "user.tandem.content_type").decode()
        except OSError:  # no attribute (octet-stream) or no user xattrs
            ctype = "application/octet-stream"
        chunks = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks), ctype, file_signature(st)
    finally:
        os.close(fd)


def disk_mode():
    return bool(CACHE_DIR) and os.path.isdir(CACHE_DIR)


# ---------------------------------------------------------------------------
# Talking to tandem


def tandem(method, path, body=None, headers=None, timeout=10):
    """(status, headers, body bytes); raises URLError when tandem is unreachable."""
    req = urllib.request.Request(TANDEM_URL + path, data=body, method=method)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    if TOKEN and method not in ("GET", "HEAD"):
        req.add_header("Authorization", "Bearer " + TOKEN)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def read_over_http(key):
    status, headers, body = tandem("GET", f"/v1/cache/{CACHE}/" + urllib.parse.quote(key, safe=""))
    if status == 404:
        raise Missing(key)
    if status != 200:
        raise RuntimeError(f"tandem answered {status}: {body[:200]!r}")
    return body, headers.get("Content-Type", "application/octet-stream"), None


# ---------------------------------------------------------------------------
# Rendered pages kept in memory


class PageCache:
    """Rendered pages by key. Entries are dropped by change events; a render
    started before a drop is not stored (tickets), so an event is never lost
    to a race with a slow render. Pages read from disk also carry their
    file's signature and are re-checked with one stat() per hit."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = {}
        self.epoch = 0  # bumped when everything is dropped
        self.gens = {}  # key -> bumped when the key is dropped
        self.hits = 0
        self.misses = 0

    def ticket(self, key):
        with self.lock:
            return (self.epoch, self.gens.get(key, 0))

    def get(self, key):
        with self.lock:
            return self.entries.get(key)

    def put(self, key, ticket, entry):
        with self.lock:
            if ticket == (self.epoch, self.gens.get(key, 0)):
                self.entries[key] = entry

    def drop(self, key):
        with self.lock:
            self.entries.pop(key, None)
            self.gens[key] = self.gens.get(key, 0) + 1

    def drop_all(self):
        with self.lock:
            n = len(self.entries)
            self.entries.clear()
            self.gens.clear()
            self.epoch += 1
            return n

    def count(self, hit):
        with self.lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def stats(self):
        with self.lock:
            return {"entries": len(self.entries), "hits": self.hits, "misses": self.misses}


PAGES = PageCache()


# ---------------------------------------------------------------------------
# tandem's event stream (Server-Sent Events)


class EventLog:
    def __init__(self):
        self.lock = threading.Lock()
        self.recent = collections.deque(maxlen=50)
        self.total = 0
        self.by_type = collections.Counter()
        self.connected = False
        self.last_event_id = None
        self.connects = 0
        self.last_error = None
        # POST /events/reconnect: leave the stream after the next event and
        # come back this many seconds later (to watch a resume).
        self.reconnect_pause = None

    def add(self, event_id, event_type, data):
        with self.lock:
            self.total += 1
            self.by_type[event_type] += 1
            self.recent.append({
                "n": self.total,
                "id": event_id,
                "event": event_type,
                "data": data,
                "received_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            })

    def snapshot(self):
        with self.lock:
            return {
                "connected": self.connected,
                "connects": self.connects,
                "last_event_id": self.last_event_id,
                "last_error": self.last_error,
                "events_total": self.total,
                "events_by_type": dict(self.by_type),
                "events": list(self.recent),
            }


EVENTS = EventLog()


def sse_events(stream):
    """Parses a text/event-stream (the WHATWG rules) from a binary file
    object read line by line. Yields (id or None, event type, data); the id
    is the stream's last event id as of this event. Comments (heartbeats,
    lines starting with ':') are skipped; `retry:` is yielded as
    (None, '__retry__', milliseconds)."""
    event_type, data, last_id, have_data = "", [], None, False
    for raw in stream:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if line == "":
            if have_data:
                yield last_id, event_type or "message", "\n".join(data)
            event_type, data, have_data = "", [], False
            continue
        if line.startswith(":"):
            continue
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "event":
            event_type = value
        elif field == "data":
            data.append(value)
            have_data = True
        elif field == "id":
            if "\0" not in value:
                last_id = value or None
        elif field == "retry":
            if value.isdigit():
                yield None, "__retry__", int(value)
    # the stream ended: an event without its blank line is discarded


def handle_event(event_id, event_type, raw):
    try:
        data = json.loads(raw)
    except ValueError:
        data = raw
    EVENTS.add(event_id, event_type, data)
    if event_type == "change" and isinstance(data, dict) and data.get("cache") == CACHE:
        op = data.get("op")
        if op in ("put", "delete") and data.get("key") is not None:
            PAGES.drop(data["key"])
            log(f"event {event_id} change {op} {CACHE}/{data['key']}: dropped from memory")
        elif op == "clear":
            n = PAGES.drop_all()
            log(f"event {event_id} change clear {CACHE}: dropped all {n} pages from memory")
        else:
            log(f"event {event_id} change {raw}")
    elif event_type == "resync":
        n = PAGES.drop_all()
        reason = data.get("reason") if isinstance(data, dict) else data
        log(f"event {event_id} resync ({reason}): dropped all {n} pages from memory")
    else:
        log(f"event {event_id} {event_type} {raw}")


def listen_events(stop):
    """Follows GET /v1/events?cache=pages for ever: reconnects after a
    disconnect (1 s, longer while tandem keeps failing), resuming with
    Last-Event-ID. While not connected, changes may be missed, so pages read
    over HTTP are not kept in memory and everything is dropped on reconnect."""
    url = f"{TANDEM_URL}/v1/events?cache={CACHE}"
    retry_ms = None  # the stream's `retry:` field, if it sent one
    http_errors = 0  # consecutive HTTP error answers (e.g. 404: no event stream in this tandem)
    last_logged, logged_at = None, 0.0
    while not stop.is_set():
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if EVENTS.last_event_id:
            headers["Last-Event-ID"] = EVENTS.last_event_id
        req = urllib.request.Request(url, headers=headers)
        error = None
        try:
            with urllib.request.urlopen(req, timeout=EVENTS_READ_TIMEOUT) as resp:
                ctype = resp.headers.get("Content-Type", "")
                if not ctype.startswith("text/event-stream"):
                    raise RuntimeError(f"not an event stream (Content-Type {ctype!r})")
                with EVENTS.lock:
                    EVENTS.connected = True
                    EVENTS.connects += 1
                    EVENTS.last_error = None
                # Anything may have changed since the last connection; the
                # stream replays from Last-Event-ID (or says resync), but
                # pages rendered meanwhile are not trusted.
                PAGES.drop_all()
                log(f"events: connected to {url}"
                    + (f" (resuming after {headers['Last-Event-ID']})" if "Last-Event-ID" in headers else ""))
                http_errors, last_logged = 0, None
                for event_id, event_type, data in sse_events(resp):
                    if event_type == "__retry__":
                        retry_ms = data
                        continue
                    if event_id:
                        with EVENTS.lock:
                            EVENTS.last_event_id = event_id
                    handle_event(event_id, event_type, data)
                    with EVENTS.lock:
                        pause, EVENTS.reconnect_pause = EVENTS.reconnect_pause, None
                    if pause is not None:
                        retry_ms = None
                        log(f"events: leaving the stream for {pause:g}s as asked (will resume after {event_id})")
                        break
                log("events: the stream ended")
        except urllib.error.HTTPError as e:
            http_errors += 1
            error = f"HTTP {e.code}: {e.read()[:200].decode('utf-8', 'replace')}"
        except Exception as e:  # connection refused (tandem restarting), timeout, reset…
            error = f"{type(e).__name__}: {e}"
        finally:
            with EVENTS.lock:
                EVENTS.connected = False
                if error:
                    EVENTS.last_error = error
            PAGES.drop_all()
        # Reconnect after 1 s (or the stream's `retry:`); an HTTP error
        # answer is retried less and less often, up to every 30 s.
        wait = retry_ms / 1000.0 if retry_ms is not None else 1.0
        if "pause" in locals() and pause is not None:
            wait, pause = pause, None
        if http_errors:
            wait = min(30.0, wait * 2 ** (http_errors - 1))
        # the same error again is logged once a minute
        if error is None or error != last_logged or time.monotonic() - logged_at > 60:
            log(f"events: {error or 'disconnected'}; reconnecting in {wait:g}s")
            last_logged, logged_at = error, time.monotonic()
        stop.wait(wait)


# ---------------------------------------------------------------------------
# Pages

TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title} · {app}</title>
<style>body{{font-family:sans-serif;max-width:46em;margin:2em auto}}
footer{{margin-top:3em;color:#666;font-size:90%;border-top:1px solid #ccc}}
textarea{{width:100%;height:6em}}</style></head>
<body>
<main>
{content}
</main>
<details><summary>Edit this page (through tandem, on every server)</summary>
<form method="post" action="/page/{qkey}"><textarea name="body">{escaped}</textarea>
<button>Save</button></form></details>
<footer>served by <b>{app}</b> · page <code>{key}</code> rendered at {rendered} from {source}</footer>
</body></html>
"""


def render(key, value, ctype, source):
    text = value.decode("utf-8", errors="replace")
    if ctype.split(";")[0].strip().lower() == "text/html":
        content = text  # pages are HTML written by the site's editors
    else:
        content = "<pre>" + html.escape(text) + "</pre>"
    return TEMPLATE.format(
        title=html.escape(key), app=html.escape(APP_NAME), content=content,
        qkey=urllib.parse.quote(key, safe=""), escaped=html.escape(text), key=html.escape(key),
        rendered=datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3], source=source,
    ).encode("utf-8")


def page(key):
    """(rendered HTML, where it came from), or raises Missing."""
    entry = PAGES.get(key)
    if disk_mode():
        if entry is not None and entry["sig"] is not None:
            try:
                st = os.stat(key_path(CACHE_DIR, CACHE, key))
            except OSError:
                st = None
            if st is not None and file_signature(st) == entry["sig"]:
                PAGES.count(True)
                return entry["html"], "memory"
        ticket = PAGES.ticket(key)
        value, ctype, sig = read_from_disk(key)
        body = render(key, value, ctype, "the cache directory")
        PAGES.put(key, ticket, {"html": body, "sig": sig})
        PAGES.count(False)
        return body, "file"
    # No cache directory: read over HTTP, keep in memory only while the
    # event stream is connected (only events invalidate these).
    if entry is not None and entry["sig"] is None and EVENTS.connected:
        PAGES.count(True)
        return entry["html"], "memory"
    ticket = PAGES.ticket(key)
    value, ctype, _ = read_over_http(key)
    body = render(key, value, ctype, "tandem's HTTP API")
    if EVENTS.connected:
        PAGES.put(key, ticket, {"html": body, "sig": None})
    PAGES.count(False)
    return body, "http"


class Handler(BaseHTTPRequestHandler):
    server_version = "pages-example/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        if os.environ.get("APP_ACCESS_LOG"):
            log(fmt % args)

    def send(self, status, body, ctype="application/json", extra=None):
        if isinstance(body, (dict, list)):
            body = (json.dumps(body, indent=1) + "\n").encode()
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", APP_NAME)
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def page_key(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/":
            return HOME
        if path.startswith("/page/") and len(path) > len("/page/"):
            return urllib.parse.unquote(path[len("/page/"):])
        return None

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/readyz":
            return self.readyz()
        if path == "/events-seen":
            snap = EVENTS.snapshot()
            snap["app"] = APP_NAME
            snap["memory_cache_entries"] = PAGES.stats()["entries"]
            snap["memory_cache"] = PAGES.stats()
            snap["reads_from"] = "files in " + CACHE_DIR if disk_mode() else TANDEM_URL
            return self.send(200, snap)
        key = self.page_key()
        if key is None:
            return self.send(404, {"error": "no such route"})
        try:
            body, source = page(key)
        except Missing:
            return self.send(404, f"<!doctype html><h1>No page {html.escape(key)!s}</h1>"
                                  f"<footer>served by <b>{html.escape(APP_NAME)}</b></footer>\n",
                             "text/html; charset=utf-8")
        except Exception as e:
            log(f"GET {key}: {type(e).__name__}: {e}")
            return self.send(502, {"error": f"reading the page: {e}"})
        self.send(200, body, "text/html; charset=utf-8", {"X-Page-Source": source})

    do_HEAD = do_GET

    def readyz(self):
        try:
            status, _, body = tandem("GET", "/readyz", timeout=3)
        except Exception as e:
            return self.send(503, {"ready": False, "app": APP_NAME, "error": f"tandem unreachable: {e}"})
        self.send(status, body)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/events/reconnect":
            q = urllib.parse.parse_qs(url.query)
            try:
                pause = float((q.get("pause") or ["3"])[0])
            except ValueError:
                return self.send(400, {"error": "pause must be a number of seconds"})
            with EVENTS.lock:
                EVENTS.reconnect_pause = pause
            return self.send(202, {"reconnect_after_next_event": True, "pause": pause})
        key = self.page_key()
        if key is None or not urllib.parse.urlsplit(self.path).path.startswith("/page/"):
            return self.send(404, {"error": "POST /page/<key>"})
        raw = self.read_body()
        ctype = self.headers.get("Content-Type", "")
        form = ctype.split(";")[0].strip().lower() == "application/x-www-form-urlencoded"
        if form:
            fields = urllib.parse.parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
            value = (fields.get("body") or fields.get("content") or [""])[0].encode("utf-8")
            store_type = "text/html; charset=utf-8"
        else:
            value = raw
            store_type = ctype or "text/html; charset=utf-8"
        self.write("PUT", key, value, store_type, form)

    def do_DELETE(self):
        key = self.page_key()
        if key is None or not urllib.parse.urlsplit(self.path).path.startswith("/page/"):
            return self.send(404, {"error": "DELETE /page/<key>"})
        self.write("DELETE", key, None, None, False)

    def write(self, method, key, value, store_type, form):
        """Writes through tandem; answers once every live server has it."""
        path = f"/v1/cache/{CACHE}/{urllib.parse.quote(key, safe='')}?wait=cluster&timeout=5s"
        headers = {"Content-Type": store_type} if store_type else {}
        try:
            status, _, body = tandem(method, path, value, headers)
        except Exception as e:
            return self.send(503, {"error": f"tandem unreachable: {e}", "app": APP_NAME})
        try:
            answer = json.loads(body)
        except ValueError:
            answer = body.decode("utf-8", "replace")
        log(f"{method} {CACHE}/{key} through tandem: {status} {answer}")
        if status in (200, 202) and form and "text/html" in self.headers.get("Accept", ""):
            # a browser's form: show the page again
            return self.send(303, "", "text/plain", {"Location": "/page/" + urllib.parse.quote(key, safe="")})
        self.send(status, {"app": APP_NAME, "key": key, "tandem": answer})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Load balancers' health checks often reset the connection once they
        # have the status line: not worth a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


def main():
    argv = sys.argv[1:]
    pidfile = os.environ.get("APP_PIDFILE", "")
    if argv[:1] == ["--pidfile"] and len(argv) >= 2:
        pidfile = argv[1]
    elif argv:
        sys.exit("usage: app.py [--pidfile FILE]   (configuration: see the environment variables in the source)")
    stop = threading.Event()
    server = Server((APP_BIND, APP_PORT), Handler)
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")

    def shutdown(signum, _frame):
        log(f"signal {signum}: stopping")
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    threading.Thread(target=listen_events, args=(stop,), name="events", daemon=True).start()
    log(f"listening on http://{APP_BIND}:{APP_PORT}/, tandem {TANDEM_URL}, "
        + (f"reading files from {CACHE_DIR}" if CACHE_DIR else "reading pages over HTTP"))
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        log("stopped")


if __name__ == "__main__":
    main()
