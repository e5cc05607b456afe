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

from conftest import Demo, wait_for
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


def test_each_sink_sends_a_kind_of_event_at_most_once_per_rate_limit(tmp_path: Path) -> None:
    import asyncio

    from engine.alerts import Alerter
    from engine.config import AlertSettings, WebhookAlerts

    web, received = _webhook_server()
    log_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log_sock.bind(str(tmp_path / "log"))
    log_sock.settimeout(5)
    try:
        settings = AlertSettings(rate_limit=60, webhook=WebhookAlerts(f"http://127.0.0.1:{web.server_port}/hook"),
                                 syslog=str(tmp_path / "log"))

        async def burst() -> None:
            alerter = Alerter(settings, "demo", "primary")
            for _ in range(3):
                alerter.submit("warning", "peer_lost", "channel to secondary silent")
            alerter.submit("error", "role_changed", "primary: active -> passive")
            alerter.submit("info", "peer_connected", "not an alert: info level")
            await alerter.drain()

        asyncio.run(burst())
        assert sorted(m["body"]["kind"] for m in received) == ["peer_lost", "role_changed"]
        lines = sorted(log_sock.recv(4096).decode() for _ in range(2))
        assert lines[0].startswith("<27>nf[") and "demo/primary role_changed: primary: active -> passive" in lines[0]
        assert lines[1].startswith("<28>nf[") and "demo/primary peer_lost: channel to secondary silent" in lines[1]
        log_sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            log_sock.recv(4096)  # nothing more: the two repeats were held back
    finally:
        web.shutdown()
        log_sock.close()


@pytest.mark.parametrize("value", ['"syslog.example:notaport"', '"relative/path"', "3"])
def test_a_bad_syslog_destination_names_the_field(tmp_path: Path, value: str) -> None:
    create(tmp_path, 2)
    with open(tmp_path / "cluster.toml", "a") as f:
        f.write(f"\n[alerts]\nsyslog = {value}\n")
    with pytest.raises(ConfigError) as err:
        load_cluster(tmp_path / "cluster.toml")
    assert "alerts.syslog" in str(err.value) and "HOST:PORT" in str(err.value)
