"""Plugins: the typed facade over pluggy, and a plugin installed through its entry point."""
from __future__ import annotations

import inspect
import re
import threading
from pathlib import Path

import pytest

from conftest import Demo, nf, wait_for
from engine import hookspecs
from engine.hookspecs import hookimpl
from engine.plugins import PluginError, Plugins
from nftui.demo import create


class PatchAgent:
    @hookimpl
    def nf_identity_files(self, node_id: str) -> list[str]:
        return [f"/etc/patch-agent/{node_id}.id", "/var/lib/patch-agent/client.dat"]


class Backup:
    @hookimpl
    def nf_identity_files(self, node_id: str) -> list[str]:
        return ["/var/lib/patch-agent/client.dat", "/etc/backup/host.key"]


def test_identity_files_of_every_plugin_are_joined() -> None:
    files = Plugins.of([PatchAgent(), Backup()]).identity_files("secondary")
    assert sorted(files) == ["/etc/backup/host.key", "/etc/patch-agent/secondary.id", "/var/lib/patch-agent/client.dat"]


@pytest.mark.parametrize("reply", [["etc/relative"], ["/etc/../shadow"], "/etc/not-a-list", [3]])
def test_a_bad_reply_names_the_plugin_and_the_value(reply: object) -> None:
    class Bad:
        @hookimpl
        def nf_identity_files(self, node_id: str) -> object:
            return reply

    with pytest.raises(PluginError) as err:
        Plugins.of([Bad()]).identity_files("primary")
    assert "nf_identity_files returned" in str(err.value) and "plugin " in str(err.value)


def test_a_slow_plugin_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.plugins

    monkeypatch.setattr(engine.plugins, "CALL_TIMEOUT", 0.2)
    release = threading.Event()

    class Slow:
        @hookimpl
        def nf_identity_files(self, node_id: str) -> list[str]:
            release.wait(30)  # the vendor call that hangs until the test is done with it
            return []

    try:
        with pytest.raises(PluginError, match="did not return within 0.2 s"):
            Plugins.of([Slow()]).identity_files("primary")
    finally:
        release.set()


def test_a_misspelt_hook_fails_at_start() -> None:
    class Typo:
        @hookimpl
        def nf_identity_file(self, node_id: str) -> list[str]:
            return []

    with pytest.raises(PluginError, match="nf_identity_file"):
        Plugins.of([Typo()])


def test_every_hookspec_is_documented_typed_and_tested() -> None:
    tests = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    specs = [f for name, f in vars(hookspecs).items() if name.startswith("nf_") and callable(f)]
    assert specs
    for spec in specs:
        assert inspect.getdoc(spec) and len(inspect.getdoc(spec) or "") > 80, spec.__name__
        sig = inspect.signature(spec)
        assert sig.return_annotation is not inspect.Signature.empty, spec.__name__
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), spec.__name__
        assert re.search(rf"def {spec.__name__}\(", tests), f"{spec.__name__} has no test plugin"


def test_an_installed_plugin_keeps_its_files_on_each_clone(demo: Demo, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin found through its `nf.integrations` entry point, by real agents."""
    site = tmp_path / "site"
    (site / "nf_test_vendor-1.0.dist-info").mkdir(parents=True)
    (site / "nf_test_vendor-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: nf-test-vendor\n"
                                                                   "Version: 1.0\n")
    (site / "nf_test_vendor-1.0.dist-info" / "entry_points.txt").write_text("[nf.integrations]\nvendor = nf_test_vendor\n")
    (site / "nf_test_vendor.py").write_text(
        "from engine.hookspecs import hookimpl\n\n\n"
        "@hookimpl\ndef nf_identity_files(node_id):\n    return ['/srv/data/vendor/client.id']\n")
    monkeypatch.setenv("PYTHONPATH", str(site))  # the agents nf demo starts inherit it
    demo.workdir.mkdir(parents=True)
    create(demo.workdir, 2)
    for node in ("primary", "secondary"):
        (demo.data(node) / "vendor").mkdir(parents=True)
        (demo.data(node) / "vendor" / "client.id").write_text(f"{node}'s client id\n")
    (demo.data("primary") / "shared.txt").write_text("replicated\n")
    demo.up(nodes=2)
    wait_for(lambda: (demo.data("secondary") / "shared.txt").exists(), 30, "shared.txt to replicate")
    assert nf("verify", "--repair", "--config", str(demo.config), check=False).returncode == 0
    assert (demo.data("secondary") / "vendor" / "client.id").read_text() == "secondary's client id\n"
