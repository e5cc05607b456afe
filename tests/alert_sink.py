"""An SMTP server (aiosmtpd, STARTTLS required, AUTH LOGIN/PLAIN) and a webhook receiver in one
process, for tests that need them inside a network namespace (`ip netns exec NS python alert_sink.py`).

Every message received is one JSON line in --out: {"sink": "smtp", "user", "tls", "mail_from",
"rcpt_tos", "content"} or {"sink": "webhook", "auth", "body"}. "ready" is written to stdout once
both listen.

    python alert_sink.py --host ADDR --smtp-port N --web-port N --cert PEM --key PEM \
        --user NAME --password-file FILE --out FILE
"""
from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Sink:
    def __init__(self, out: Path, user: str, password: str) -> None:
        self.out = out
        self.user = user
        self.password = password
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        with self.lock, self.out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    # aiosmtpd's authenticator and handler API
    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == self.user
              and auth_data.password.decode() == self.password)
        return AuthResult(success=ok, handled=False, auth_data=auth_data.login.decode() if ok else None)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.write({"sink": "smtp", "user": session.auth_data if session.authenticated else None,
                    "tls": session.ssl is not None, "mail_from": envelope.mail_from,
                    "rcpt_tos": envelope.rcpt_tos, "content": envelope.content.decode(errors="replace")})
        return "250 OK"


def main() -> None:
    ap = argparse.ArgumentParser()
    for opt in ("host", "cert", "key", "user", "password-file", "out"):
        ap.add_argument(f"--{opt}", required=True)
    ap.add_argument("--smtp-port", type=int, required=True)
    ap.add_argument("--web-port", type=int, required=True)
    args = ap.parse_args()
    sink = Sink(Path(args.out), args.user, Path(args.password_file).read_text().strip())

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.cert, args.key)
    smtp = Controller(sink, hostname=args.host, port=args.smtp_port, tls_context=tls, require_starttls=True,
                      authenticator=sink, auth_required=True, auth_require_tls=True)
    smtp.start()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            sink.write({"sink": "webhook", "auth": self.headers.get("Authorization"), "body": json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    web = HTTPServer((args.host, args.web_port), Hook)
    print("ready", flush=True)
    try:
        web.serve_forever()  # until the test kills this process
    finally:
        smtp.stop()


if __name__ == "__main__":
    sys.exit(main())
