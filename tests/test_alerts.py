"""Alerts reach a real SMTP server and a webhook receiver when the cluster fails over."""
from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from conftest import Demo, nf, wait_for
from engine.config import load_cluster
from engine.errors import ConfigError
from nftui.demo import create


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd API)
        self.messages.append(envelope)
        return "250 OK"


def _webhook_server() -> tuple[HTTPServer, list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"auth": self.headers.get("Authorization"), "body": json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def test_a_failover_alerts_by_email_and_webhook(demo: Demo) -> None:
    inbox = _Inbox()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        smtp_port = probe.getsockname()[1]
    smtp = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    web, received = _webhook_server()
    try:
        demo.workdir.mkdir(parents=True)
        create(demo.workdir, 2)
        token = demo.workdir / "webhook.token"
        token.write_text("s3cret-token\n")
        token.chmod(0o600)
        with open(demo.config, "a") as f:
            f.write(f'\n[alerts]\nrate_limit = 0\n[alerts.email]\nhost = "127.0.0.1"\nport = {smtp_port}\n'
                    f'from = "nf@demo.test"\nto = ["ops@demo.test"]\n'
                    f'[alerts.webhook]\nurl = "http://127.0.0.1:{web.server_port}/hook"\ntoken_file = "webhook.token"\n')
        demo.up(nodes=2)
        demo.kill("primary")
        wait_for(lambda: any(m["body"]["kind"] == "role_changed" for m in received), 30, "a role_changed webhook")
        hook = next(m for m in received if m["body"]["kind"] == "role_changed")
        assert hook["auth"] == "Bearer s3cret-token"
        assert hook["body"]["node"] == "secondary" and "passive -> active" in hook["body"]["message"]
        wait_for(lambda: any(b"role_changed" in m.content for m in inbox.messages), 30, "a role_changed email")
        mail = next(m for m in inbox.messages if b"role_changed" in m.content)
        assert mail.rcpt_tos == ["ops@demo.test"]
        for log in demo.workdir.glob("*/agent.log"):
            assert "s3cret-token" not in log.read_text()
    finally:
        smtp.stop()
        web.shutdown()


def test_a_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    create(tmp_path, 2)
    token = tmp_path / "token"
    token.write_text("x")
    os.chmod(token, 0o644)
    with open(tmp_path / "cluster.toml", "a") as f:
        f.write('\n[alerts.webhook]\nurl = "http://127.0.0.1:9/hook"\ntoken_file = "token"\n')
    with pytest.raises(ConfigError) as err:
        load_cluster(tmp_path / "cluster.toml")
    assert "alerts.webhook.token_file" in str(err.value) and "0600" in str(err.value)
