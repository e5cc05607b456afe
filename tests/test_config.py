"""cluster.toml and node.toml: what loads, what is refused, and how filters decide."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from engine.config import (HeartbeatSettings, NodeSpec, ProtectedTree, PublicIdentity, ReplicationSettings,
                           dump_cluster_toml, dump_node_toml, load_cluster, load_node)
from engine.errors import ConfigError

CLUSTER = """\
[cluster]
name = "demo"

[public]
fqdn = "app01.example.test"
netbios = "APP01"
addresses = ["127.0.10.1"]
provider = "local"

[[nodes]]
id = "primary"
channel = "127.0.10.2:7780"
management = "127.0.10.2"

[[nodes]]
id = "secondary"
channel = "127.0.10.3:7780"
management = "127.0.10.3"

[[protected]]
path = "/srv/data"
include = []
exclude = ["*.tmp", "cache/"]
"""

NODE = """\
[node]
id = "primary"
root = "root"
state_dir = "/var/lib/nf"

[tls]
ca = "tls/ca.pem"
cert = "tls/node.pem"
key = "tls/node.key"
"""


def write_cluster(tmp_path: Path, text: str = CLUSTER) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def write_node(tmp_path: Path, text: str = NODE, key_mode: int = 0o600) -> Path:
    tls = tmp_path / "tls"
    tls.mkdir(exist_ok=True)
    for name in ("ca.pem", "node.pem", "node.key"):
        (tls / name).write_text("PEM\n")
    os.chmod(tls / "node.key", key_mode)
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_a_valid_cluster_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_cluster(write_cluster(tmp_path))
    assert cfg.name == "demo"
    assert cfg.public == PublicIdentity("app01.example.test", "APP01", ("127.0.10.1",), "local")
    assert cfg.node("secondary") == NodeSpec("secondary", "127.0.10.3", 7780, "127.0.10.3",
                                             "app01-nf-secondary", "APP01-NF2", "example.test")
    assert cfg.node("secondary").cozen_fqdn == "app01-nf-secondary.example.test"
    assert cfg.protected == (ProtectedTree("/srv/data", (), ("*.tmp", "cache/")),)
    assert cfg.protected[0].rel == "srv/data"
    assert cfg.replication == ReplicationSettings()
    assert cfg.heartbeat == HeartbeatSettings()
    assert cfg.path == tmp_path / "cluster.toml"


def test_settings_and_ipv6_channels_are_read(tmp_path: Path) -> None:
    text = (CLUSTER.replace('"127.0.10.3:7780"', '"[::1]:7781"').replace('"/srv/data"', '"/srv/data/"')
            + "[replication]\nblock_size = 4096\ncompression = \"none\"\nrescan_interval = 60\n"
            + "[heartbeat]\ninterval = 1\nfailover_timeout = 2.5\n")
    cfg = load_cluster(write_cluster(tmp_path, text))
    assert cfg.node("secondary").channel_host == "::1"
    assert cfg.node("secondary").channel == "[::1]:7781"
    assert cfg.protected[0].path == "/srv/data"
    assert cfg.replication == ReplicationSettings(block_size=4096, compression="none", rescan_interval=60.0)
    assert cfg.heartbeat == HeartbeatSettings(interval=1.0, failover_timeout=2.5)


def test_asking_for_an_unknown_node_names_the_known_ones(tmp_path: Path) -> None:
    cfg = load_cluster(write_cluster(tmp_path))
    with pytest.raises(ConfigError, match="primary, secondary"):
        cfg.node("tertiary")


SECONDARY = 'id = "secondary"\nchannel = "127.0.10.3:7780"'
TERTIARY = '\n[[nodes]]\nid = "tertiary"\nchannel = "127.0.10.4:7780"\nmanagement = "127.0.10.4"\n'


@pytest.mark.parametrize("old, new, field", [
    ('name = "demo"', 'name = "Demo!"', "cluster.name"),
    ('id = "secondary"', 'id = "backup"', "nodes[1].id"),
    ('id = "secondary"', 'id = "primary"', "nodes[1].id"),
    ('id = "secondary"', 'id = "tertiary"', "nodes"),
    (SECONDARY, 'id = "secondary"\nchannel = "127.0.10.2:7780"', "nodes[1].channel"),
    ('"127.0.10.3:7780"', '"127.0.10.3:70000"', "nodes[1].channel"),
    ('"127.0.10.3:7780"', '"127.0.10.3"', "nodes[1].channel"),
    ('management = "127.0.10.3"', 'management = "node-b"', "nodes[1].management"),
    ('addresses = ["127.0.10.1"]', 'addresses = ["127.0.10.300"]', "public.addresses"),
    ('addresses = ["127.0.10.1"]', 'addresses = []', "public.addresses"),
    ('netbios = "APP01"', 'netbios = "APPLICATION-SERVER-01"', "public.netbios"),
    ('provider = "local"', 'provider = "cloud"', "public.provider"),
    ('include = []', 'include = []\n[[protected]]\npath = "/srv/data/sub"', "protected[1].path"),
    ('include = []', 'include = []\n[[protected]]\npath = "/srv"', "protected[1].path"),
    ('path = "/srv/data"', 'path = "srv/data"', "protected[0].path"),
    ('path = "/srv/data"', 'path = "/"', "protected[0].path"),
    ('path = "/srv/data"', 'path = "/srv/../data"', "protected[0].path"),
    ('fqdn = "app01.example.test"', 'fqdn = "app01.example.test"\nfdqn = "x"', "public.fdqn"),
    ('name = "demo"', 'name = "demo"\n[replicaton]', "replicaton"),
    ('include = []', 'include = []\n[replication]\nblock_size = 5000', "replication.block_size"),
    ('include = []', 'include = []\n[replication]\nblock_size = 2048', "replication.block_size"),
    ('include = []', 'include = []\n[replication]\nblock_size = true', "replication.block_size"),
    ('include = []', 'include = []\n[replication]\nmax_frame_bytes = 8192', "replication.max_frame_bytes"),
    ('include = []', 'include = []\n[replication]\ncompression_level = 22', "replication.compression_level"),
    ('include = []', 'include = []\n[heartbeat]\ninterval = 2', "heartbeat.failover_timeout"),
    ('include = []', 'include = []\n[heartbeat]\ninterval = 0', "heartbeat.interval"),
    ('[cluster]\nname = "demo"\n', '', "cluster"),
])
def test_a_bad_cluster_value_is_refused_naming_file_and_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert old in CLUSTER
    path = write_cluster(tmp_path, CLUSTER.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_cluster(path)
    assert caught.value.field == field
    assert caught.value.file == str(path)
    assert str(path) in str(caught.value) and field in str(caught.value)


def test_a_third_node_is_allowed_but_a_fourth_is_not(tmp_path: Path) -> None:
    assert len(load_cluster(write_cluster(tmp_path, CLUSTER + TERTIARY)).nodes) == 3
    fourth = TERTIARY.replace("tertiary", "primary").replace(".4", ".5")
    with pytest.raises(ConfigError) as caught:
        load_cluster(write_cluster(tmp_path, CLUSTER + TERTIARY + fourth))
    assert caught.value.field == "nodes"


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_cluster(path)
    assert caught.value.file == str(path) and caught.value.field == ""
    assert str(path) in str(caught.value)


def test_a_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write_cluster(tmp_path, CLUSTER.replace('name = "demo"', 'name = demo'))
    with pytest.raises(ConfigError) as caught:
        load_cluster(path)
    assert caught.value.field == "line 2"
    assert str(path) in str(caught.value)


def test_a_node_config_resolves_relative_paths_beside_itself(tmp_path: Path) -> None:
    cluster = load_cluster(write_cluster(tmp_path))
    node = load_node(write_node(tmp_path), cluster)
    assert node.id == "primary"
    assert node.root == tmp_path / "root"
    assert node.state_dir == Path("/var/lib/nf")
    assert node.key == tmp_path / "tls" / "node.key"
    assert node.socket == Path("/var/lib/nf/agent.sock")


@pytest.mark.parametrize("old, new, field", [
    ('id = "primary"', 'id = "tertiary"', "node.id"),
    ('id = "primary"', 'id = "primry"', "node.id"),
    ('key = "tls/node.key"', 'key = "tls/missing.key"', "tls.key"),
    ('ca = "tls/ca.pem"', 'ca = "tls/none.pem"', "tls.ca"),
    ('state_dir = "/var/lib/nf"', 'state_dir = "/var/lib/nf"\nstatedir = "/x"', "node.statedir"),
    ('[tls]', '[tsl]', "tsl"),
])
def test_a_bad_node_value_is_refused_naming_file_and_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    cluster = load_cluster(write_cluster(tmp_path))
    path = write_node(tmp_path, NODE.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_node(path, cluster)
    assert caught.value.field == field
    assert str(path) in str(caught.value) and field in str(caught.value)


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = write_node(tmp_path, key_mode=0o644)
    with pytest.raises(ConfigError) as caught:
        load_node(path)
    assert caught.value.field == "tls.key"
    assert "mode 0600" in caught.value.expected
    assert "0644" in str(caught.value)


# -- filters ------------------------------------------------------------------------------

TREE = ProtectedTree("/srv/data", include=(), exclude=("*.tmp", "cache/", "logs/old/*", "/build"))


@pytest.mark.parametrize("rel, is_dir, wanted", [
    ("", True, True),
    ("a.txt", False, True),
    ("a.tmp", False, False),
    ("deep/er/a.tmp", False, False),
    ("x.tmp", True, False),                 # no trailing slash: files and directories alike
    ("cache", True, False),
    ("sub/cache", True, False),
    ("sub/cache/file", False, False),       # inside an excluded directory, checked on its own
    ("cache", False, True),                 # "cache/" matches directories only
    ("logs/old/a.log", False, False),       # a pattern with "/" matches the whole path
    ("x/logs/old/a.log", False, True),
    ("build", True, False),                 # a leading "/" anchors at the tree root
    ("build/out.o", False, False),
    ("src/build", True, True),
    (".nf-stage", True, False),             # nf's own staging directory
    (".nf-stage/x", False, False),
    ("sub/.nf-stage", True, True),
])
def test_exclude_patterns(rel: str, is_dir: bool, wanted: bool) -> None:
    assert TREE.wants(rel, is_dir) is wanted


@pytest.mark.parametrize("rel, is_dir, wanted", [
    ("a.conf", False, True),
    ("etc/b.conf", False, True),
    ("a.txt", False, False),
    ("etc", True, True),                    # directories stay wanted: an included file may be below
    ("keep/anything.bin", False, True),     # "keep/" includes everything below such a directory
    ("x/keep/deep/f", False, True),
    ("keep", False, False),
    ("cache/a.conf", False, False),         # exclude wins over include
])
def test_include_patterns_apply_to_files(rel: str, is_dir: bool, wanted: bool) -> None:
    tree = ProtectedTree("/srv/data", include=("*.conf", "keep/"), exclude=("cache/",))
    assert tree.wants(rel, is_dir) is wanted


# -- writers ------------------------------------------------------------------------------

def test_written_toml_round_trips_awkward_strings(tmp_path: Path) -> None:
    public = PublicIdentity("app01.example.test", None, ("10.0.0.1/24", "fd00::1"), "linux")
    nodes = [NodeSpec("primary", "10.0.0.2", 7780, "10.0.0.2", "web-a", "WEB-A", "example.test"),
             NodeSpec("secondary", "fd00::3", 7780, "fd00::3", "web-b", "WEB-B", "dmz.example.test")]
    trees = [ProtectedTree("/srv/da\"ta\\x", ("*.c",), ('we"ird\n\t\x01', "ü/"))]
    text = dump_cluster_toml("demo", public, nodes, trees, ReplicationSettings(coalesce_ms=0))
    cfg = load_cluster(write_cluster(tmp_path, text))
    assert cfg.public == public
    assert cfg.nodes == tuple(nodes)
    assert cfg.protected == tuple(trees)
    assert cfg.replication == ReplicationSettings(coalesce_ms=0)
    node = tomllib.loads(dump_node_toml("primary", "/r o\"ot", "s", "a", "b", "c"))
    assert node["node"] == {"id": "primary", "root": "/r o\"ot", "state_dir": "s"}


def test_applications_config_names_the_bad_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engine.init import NodePlan, init_cluster

    cfg = init_cluster(tmp_path / "c", "demo", "app.test", ["127.0.0.9"], [
        NodePlan("primary", "127.0.0.9:7781", "127.0.0.9", tmp_path / "r1", tmp_path / "s1"),
        NodePlan("secondary", "127.0.0.9:7782", "127.0.0.9", tmp_path / "r2", tmp_path / "s2")])
    base = cfg.read_text()
    cfg.write_text(base + '\n[[applications]]\nname = "web"\nunit = "nginx.service"\n')
    app = load_cluster(cfg).applications[0]
    assert app.start == "systemctl start nginx.service" and app.on_failure == "switchover"
    cfg.write_text(base + '\n[[applications]]\nname = "web"\nunit = "nginx.service"\non_failure = "reboot"\n')
    with pytest.raises(ConfigError, match=r"applications\[0\]\.on_failure"):
        load_cluster(cfg)
