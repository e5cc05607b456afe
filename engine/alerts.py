"""Alerts: warning and error events go to email, a webhook and syslog, rate-limited per kind.

Sending happens in worker threads and never blocks the agent's loop; a sink that fails logs
why and the next alert tries again. Secrets (SMTP password, webhook token) are read from their
files at send time, so rotating them needs no restart, and they never reach a log line.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config import AlertSettings, EmailAlerts, WebhookAlerts

log = logging.getLogger("nf.alerts")

SEND_TIMEOUT = 10.0
LEVELS = ("warning", "error")


class Alerter:
    def __init__(self, settings: "AlertSettings", cluster: str, node: str) -> None:
        self.settings = settings
        self.cluster = cluster
        self.node = node
        self._last: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        s = self.settings
        return bool(s.email or s.webhook or s.syslog)

    def submit(self, level: str, kind: str, message: str) -> None:
        """Queue an alert for every sink whose rate limit allows it; returns at once."""
        if level not in LEVELS or not self.enabled:
            return
        alert = {"cluster": self.cluster, "node": self.node, "level": level, "kind": kind,
                 "message": message, "ts": time.time()}
        for sink in ("email", "webhook", "syslog"):
            if getattr(self.settings, sink) and self._allowed(sink, kind):
                task = asyncio.ensure_future(asyncio.to_thread(self._send, sink, alert))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for alerts in flight (at shutdown)."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=SEND_TIMEOUT)

    def _allowed(self, sink: str, kind: str) -> bool:
        now = time.monotonic()
        last = self._last.get((sink, kind))
        if last is not None and now - last < self.settings.rate_limit:
            return False
        self._last[(sink, kind)] = now
        return True

    def _send(self, sink: str, alert: dict[str, Any]) -> None:
        try:
            if sink == "email":
                assert self.settings.email is not None
                _email(self.settings.email, alert)
            elif sink == "webhook":
                assert self.settings.webhook is not None
                _webhook(self.settings.webhook, alert)
            else:
                _syslog(self.settings.syslog, alert)
        except (OSError, ValueError) as exc:  # smtplib's errors are OSErrors
            log.warning("alert to %s failed: %s", sink, type(exc).__name__ if "password" in str(exc).lower() else exc)


def _email(cfg: "EmailAlerts", alert: dict[str, Any]) -> None:
    # Imported here: smtplib and email cost every agent 15 ms of start-up, which a joining
    # passive's sync waits out, and most clusters never send mail.
    import smtplib
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"] = cfg.sender
    msg["To"] = ", ".join(cfg.recipients)
    msg["Subject"] = f"[nf {alert['cluster']}] {alert['level']}: {alert['kind']} on {alert['node']}"
    msg.set_content(f"{alert['message']}\n\ncluster {alert['cluster']}, node {alert['node']}, "
                    f"at {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(alert['ts']))}\n")
    with smtplib.SMTP(cfg.host, cfg.port, timeout=SEND_TIMEOUT, local_hostname=socket.gethostname()) as smtp:
        if cfg.starttls:
            smtp.starttls(context=ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None))
        if cfg.username and cfg.password_file:
            smtp.login(cfg.username, cfg.password_file.read_text().strip())
        smtp.send_message(msg)


def _syslog(address: str, alert: dict[str, Any]) -> None:
    """One RFC 3164 datagram, facility daemon, to a Unix socket (/dev/log) or HOST:PORT over UDP."""
    severity = 3 if alert["level"] == "error" else 4  # err, warning
    text = (f"<{(3 << 3) | severity}>nf[{os.getpid()}]: {alert['cluster']}/{alert['node']} "
            f"{alert['kind']}: {alert['message']}")
    if address.startswith("/"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.settimeout(SEND_TIMEOUT)
            s.sendto(text.encode(), address)
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode()[:2048], (host, int(port)))


def _webhook(cfg: "WebhookAlerts", alert: dict[str, Any]) -> None:
    import urllib.request  # 12 ms of start-up otherwise, as smtplib above

    headers = {"Content-Type": "application/json", "User-Agent": "nf-alerts"}
    if cfg.token_file:
        headers["Authorization"] = f"Bearer {cfg.token_file.read_text().strip()}"
    req = urllib.request.Request(cfg.url, data=json.dumps(alert).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=SEND_TIMEOUT) as resp:
        if resp.status >= 300:
            raise OSError(f"webhook answered HTTP {resp.status}")
