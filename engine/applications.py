"""Protected applications: started in order on the active only, stopped in reverse, monitored.

A failed monitor restarts the application (stop, start) up to `restarts` times; after that
the failure policy applies: `switchover` asks the agent to hand the cluster to a passive,
`alert` raises an error event and leaves it to the operator. Every command runs as a
subprocess off the loop, bounded by the application's timeout, with NF_NODE, NF_CLUSTER and
NF_APPLICATION in its environment.
"""
from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import Application

OnEvent = Callable[..., None]
OnGiveUp = Callable[["Application", str], Awaitable[None]]


class Applications:
    def __init__(self, apps: tuple["Application", ...], cluster: str, node: str, on_event: OnEvent) -> None:
        self.apps = apps
        self.env = {**os.environ, "NF_CLUSTER": cluster, "NF_NODE": node}
        self.on_event = on_event
        self.running: list[str] = []
        self.restarts: dict[str, int] = {}
        self.failed: set[str] = set()

    async def start_all(self) -> None:
        self.failed.clear()
        for app in self.apps:
            self.running.append(app.name)  # a start cut short by the role's end is stopped all the same
            ok, detail = await self._run(app, app.start)
            if ok:
                self.restarts[app.name] = 0
                self.on_event("info", "application_started", f"started {app.name}")
            else:
                self.running.remove(app.name)
                self.on_event("error", "application_failed", f"could not start {app.name}: {detail}")

    async def stop_all(self) -> None:
        """Stop in reverse order; idempotent."""
        for app in reversed(self.apps):
            if app.name not in self.running:
                continue
            ok, detail = await self._run(app, app.stop)
            self.running.remove(app.name)
            self.on_event("info" if ok else "error", "application_stopped",
                          f"stopped {app.name}" if ok else f"stop of {app.name} failed: {detail}")

    async def monitor_forever(self, give_up: OnGiveUp) -> None:
        """Check each running application at its interval; restart, then apply its policy."""
        if not self.apps:
            return
        interval = min(app.monitor_interval for app in self.apps)
        while True:
            await asyncio.sleep(interval)
            for app in self.apps:
                if app.name not in self.running or app.name in self.failed:
                    continue
                ok, detail = await self._run(app, app.monitor)
                if ok:
                    continue
                if self.restarts[app.name] < app.restarts:
                    self.restarts[app.name] += 1
                    self.on_event("warning", "application_restart",
                                  f"{app.name} monitor failed ({detail}); restart {self.restarts[app.name]} "
                                  f"of {app.restarts}")
                    await self._run(app, app.stop)
                    await self._run(app, app.start)
                    continue
                self.on_event("error", "application_failed",
                              f"{app.name} still failing after {app.restarts} restart(s) ({detail}); "
                              f"policy: {app.on_failure}")
                self.failed.add(app.name)  # no more monitoring; still stopped when the role ends
                await give_up(app, detail)

    async def _run(self, app: "Application", command: str) -> tuple[bool, str]:
        """Run one command in a session of its own, bounded by the application's timeout.

        `asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` returns the result of a
        command that finished at the moment its task was cancelled and drops the cancellation,
        so a monitor check that ended as the role ended kept the monitor running forever, and
        the step-down that waited for it never released the public identity.
        """
        env = dict(self.env, NF_APPLICATION=app.name)
        proc = await asyncio.create_subprocess_shell(command, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                     stdout=asyncio.subprocess.DEVNULL,
                                                     stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            async with asyncio.timeout(app.timeout):
                _, err = await proc.communicate()
        except TimeoutError:
            _kill_session(proc)
            await proc.wait()
            return False, f"timed out after {app.timeout:g} s"
        except asyncio.CancelledError:
            _kill_session(proc)  # a role that ends leaves no check or command of it running
            await proc.wait()  # reaped here: left to the transport's clean-up, asyncio logs "Unknown child process"
            raise
        if proc.returncode == 0:
            return True, ""
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
        return False, f"exit {proc.returncode}" + (f": {tail[0]}" if tail else "")


def _kill_session(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command and whatever it started (its session is its process group); once
    the command is reaped its number may belong to someone else, so nothing is sent."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone, with everything it started
