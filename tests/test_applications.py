"""Protected applications: only on the active, restarted on failure, then switched over."""
from __future__ import annotations

from conftest import Demo, wait_for
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
