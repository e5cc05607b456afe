"""Protected applications: only on the active, restarted on failure, then switched over."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from conftest import Demo, wait_for
from engine.applications import Applications
from engine.config import Application
from nftui.demo import create


def _configure(demo: Demo, restarts: int) -> None:
    demo.workdir.mkdir(parents=True)
    create(demo.workdir, 2)
    w = demo.workdir
    with open(demo.config, "a") as f:
        f.write(
            "\n[[applications]]\nname = \"web\"\n"
            f"start = \"echo start >> {w}/starts-$NF_NODE; touch {w}/running-$NF_NODE\"\n"
            f"stop = \"rm -f {w}/running-$NF_NODE\"\n"
            f"monitor = \"test -f {w}/running-$NF_NODE && test ! -f {w}/broken-$NF_NODE\"\n"
            f"restarts = {restarts}\nmonitor_interval = 0.2\ntimeout = 5\n")


def test_applications_run_only_on_the_active_and_restart_when_their_monitor_fails(demo: Demo) -> None:
    _configure(demo, restarts=3)
    demo.up(nodes=2)
    w = demo.workdir
    wait_for(lambda: (w / "running-primary").exists(), 15, "web to run on the primary")
    assert not (w / "running-secondary").exists(), "applications never start on a passive"
    (w / "running-primary").unlink()  # the service dies behind our back
    # the start command logs "start" before it touches running-*: wait for both, not one then the other
    wait_for(lambda: (w / "starts-primary").read_text().count("start") == 2 and (w / "running-primary").exists(),
             15, "one restart, running again")
    assert (w / "starts-primary").read_text().count("start") == 2
    assert not (w / "running-secondary").exists()


def test_an_application_that_keeps_failing_switches_over(demo: Demo) -> None:
    _configure(demo, restarts=1)
    demo.up(nodes=2)
    w = demo.workdir
    (demo.data("primary") / "before").write_text("written before the failure\n")
    wait_for(lambda: (w / "running-primary").exists(), 15, "web to run on the primary")
    (w / "broken-primary").touch()
    wait_for(lambda: demo.node_status("secondary")["role"] == "active", 30, "the switchover to the secondary")
    wait_for(lambda: (w / "running-secondary").exists(), 15, "web to run on the secondary")
    assert not (w / "running-primary").exists()
    assert (demo.data("secondary") / "before").read_text() == "written before the failure\n"


# -- Applications alone: commands, timeouts and cancellation -----------------------------

def _apps(monitor: str, *, timeout: float = 5.0, interval: float = 0.001) -> Applications:
    apps = Applications((Application("web", "true", "true", monitor, timeout=timeout, monitor_interval=interval),),
                        "c", "n", lambda *args, **kwargs: None)
    apps.running.append("web")
    apps.restarts["web"] = 0
    return apps


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_a_monitor_cancelled_as_its_check_ends_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A role that ends cancels the monitor; whatever moment that lands on, the monitor stops.

    Swept over the loop turns after a check's process has exited: on Python 3.11
    `asyncio.wait_for` returned the finished check's result there and dropped the cancellation,
    the monitor ran on, and the step-down waiting for it never released the public identity.
    """
    procs: list[asyncio.subprocess.Process] = []
    real = asyncio.create_subprocess_shell

    async def recorded(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        procs.append(await real(*args, **kwargs))
        return procs[-1]

    monkeypatch.setattr(asyncio, "create_subprocess_shell", recorded)

    async def sweep() -> list[int]:
        loop = asyncio.get_running_loop()
        apps = _apps("true")
        ran_on = []
        for turns in range(25):
            procs.clear()
            task = asyncio.ensure_future(apps.monitor_forever(lambda app, detail: asyncio.sleep(0)))

            def cancel_after(n: int) -> None:
                if n == 0:
                    task.cancel()
                else:
                    loop.call_soon(cancel_after, n - 1)

            def watch() -> None:  # every loop turn until the first check's process has exited
                if procs and procs[0].returncode is not None:
                    cancel_after(turns)
                else:
                    loop.call_soon(watch)

            loop.call_soon(watch)
            done, _ = await asyncio.wait({task}, timeout=2)
            if not done:
                ran_on.append(turns)
                for _ in range(20):  # let the test end either way
                    task.cancel()
                    if (await asyncio.wait({task}, timeout=0.5))[0]:
                        break
        return ran_on

    assert asyncio.run(sweep()) == [], "the monitor ran on after these cancellations (loop turns after the check)"


def test_a_command_that_times_out_is_killed_with_what_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    apps = _apps(f"sleep 60 </dev/null >/dev/null 2>&1 & echo $! > {pid_file}; wait", timeout=0.5)
    ok, detail = asyncio.run(apps._run(apps.apps[0], apps.apps[0].monitor))
    assert (ok, detail) == (False, "timed out after 0.5 s")
    child = int(pid_file.read_text())
    wait_for(lambda: not _alive(child), 5, "the command's own child to be killed too")


def test_a_cancelled_check_leaves_no_process_behind(tmp_path: Path) -> None:
    pid_file = tmp_path / "check.pid"

    async def cancel_mid_check() -> None:
        apps = _apps(f"echo $$ > {pid_file}; exec sleep 60", interval=0.01)
        task = asyncio.ensure_future(apps.monitor_forever(lambda app, detail: asyncio.sleep(0)))
        async with asyncio.timeout(10):  # the check has started
            while not pid_file.exists() or not pid_file.read_text().strip():
                await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(cancel_mid_check())
    check = int(pid_file.read_text())
    wait_for(lambda: not _alive(check), 5, "the cancelled check's process to be killed")


def test_a_start_cut_short_by_the_end_of_the_role_is_still_stopped(tmp_path: Path) -> None:
    """The role can end while a start command runs (a woken old active steps down): what the
    command had started by then is stopped like any running application."""
    app = Application("web", f"touch {tmp_path}/started; exec sleep 60", f"touch {tmp_path}/stopped", "true")
    apps = Applications((app,), "c", "n", lambda *args, **kwargs: None)

    async def leave_mid_start() -> None:
        task = asyncio.ensure_future(apps.start_all())
        async with asyncio.timeout(10):
            while not (tmp_path / "started").exists():
                await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await apps.stop_all()

    asyncio.run(leave_mid_start())
    assert (tmp_path / "stopped").exists()
    assert apps.running == []
