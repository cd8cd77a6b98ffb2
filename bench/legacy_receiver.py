"""The baseline: upstream's ``start_receive_from_workers`` design, reproduced for measurement.

Upstream (sio2project/oioioi, ``oioioi/workers/management/commands/start_receive_from_workers.py``)
runs a ``socketserver.TCPServer`` (one request at a time, default listen backlog of 5,
``allow_reuse_address``) with an ``http.server`` handler whose POST:

1. parses the multipart form (upstream: ``cgi.FieldStorage``; here the ``multipart`` package,
   since ``cgi`` is gone from Python 3.13) and answers 404 without a ``data`` field;
2. ``json.loads`` the field, deletes ``workers_jobs`` and ``workers_jobs.extra_args`` and asserts
   that ``workers_jobs.results`` or ``error`` is present;
3. calls ``delay_environ(env)`` inside ``transaction.atomic()``;
4. answers 200 ``OK`` after the commit, logging four INFO lines per request as upstream does.

Upstream's ``delay_environ`` hands the resumed environ to Celery (``evalmgr_job.apply_async``)
inside the transaction; the stand-in's ``delay_environ`` does the same with real Celery (kombu's
persistent publish without confirms, on a pooled connection), to a queue of the benchmark's own
(``EVALMGR_CELERY_QUEUE``, ``CELERY_ALWAYS_EAGER=0``). The recipe then runs elsewhere (a Celery
worker), so its cost is not charged to this receiver, while the consumer pays for its own recipes.

Run: ``DJANGO_SETTINGS_MODULE=bench.settings python -m bench.legacy_receiver --port N``.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import socketserver

log = logging.getLogger("bench.legacy_receiver")


def _form_data(handler: http.server.BaseHTTPRequestHandler) -> str | None:
    import multipart

    content_type, options = multipart.parse_options_header(handler.headers["Content-Type"] or "")
    if content_type != "multipart/form-data" or "boundary" not in options:
        return None
    length = int(handler.headers["Content-Length"] or -1)
    parser = multipart.MultipartParser(handler.rfile, options["boundary"], content_length=length)
    for part in parser:
        if part.name == "data":
            return part.value
    return None


class ServerHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(404)

    def do_POST(self) -> None:
        from django.db import transaction

        from oioioi.evalmgr.tasks import delay_environ

        log.info("Swd receiver got POST from %r", self.client_address)
        data = _form_data(self)
        if data is None:
            self.send_error(404)
            return
        env = json.loads(data)
        del env["workers_jobs"]
        env.pop("workers_jobs.extra_args", None)
        assert "workers_jobs.results" in env or "error" in env
        log.info("Swd receiver enqueuing environ")
        with transaction.atomic():
            delay_environ(env)
        log.info("Swd receiver sending response")
        self.send_response(200, "OK")
        self.send_header("Content-type", "text/plain")
        self.end_headers()
        self.wfile.write(b"OK")
        log.info("Swd receiver done with %r", self.client_address)


class Server(socketserver.TCPServer):
    allow_reuse_address = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, required=True, help="Port to listen on.")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    httpd = Server((args.host, args.port), ServerHandler)
    log.info("Legacy receiver listening on %s:%d.", args.host, args.port)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
