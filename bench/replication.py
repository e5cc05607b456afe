"""Replication benchmark: nf against cp, rsync and lsyncd, on the same data and machine, in one run.

Usage: python bench/replication.py [--quick] [--only sync,lag,delta,memory] [--out bench/out/replication.json]

What is measured, and why it is a fair comparison:

1. sync   -- initial sync of 1 GiB in 8 large random files plus 20,000 small files (256 B-2 KiB) in
   200 directories. nf: a new passive joins a running active. The active agent is started on the
   data first (a daemon, like rsync's; its start-up walk is part of (4)), then the page cache is
   dropped and the clock starts: wall time from spawning the passive's agent until the active's
   status says the passive is level (no send queue, not syncing, same applied sequence) and a
   file count/size check of both trees agrees; the passive's start-up until connected is shown.
   Baselines: `cp -a`, `rsync -a` local, and rsync over its daemon on loopback; and, as a
   reference for what encryption alone costs here, tar piped through one mutual-TLS connection on
   loopback (socat) into tar. Five rounds (one with --quick), each in an order rotated by one, so
   that each tool runs once in each place; each tool's median is reported. The page cache is
   dropped before every run so everyone reads the source from disk. nf flushes the replica (syncfs)
   before it counts the passive level; the baselines do not, so their time is also shown with a
   trailing `sync` (ratios use the faster figure without it, which is stricter on nf). No copy is
   deleted until the run ends: ext4 creates files slowly for minutes after many were deleted, which
   would handicap whoever ran next (leave a few minutes between runs for the same reason). Each
   tool's CPU time (user and system, all its processes: both nf agents; rsync's sender, receiver
   and daemon side) is shown too: on a machine of two CPUs shared by both ends, CPU is what the
   wall times trade.
2. lag    -- a writer overwrites/creates small files at a fixed rate (deadline-scheduled, no sleep
   drift); an inotify watcher on the destination reads each file that lands and records, per
   write, the time until the destination holds that version or a newer one. nf against lsyncd
   with its defaults and with `delay = 1`. Writer and watcher share one monotonic clock.
3. delta  -- bytes sent for a 1 % in-place edit of a 1 GiB file: 160 writes of 64 KiB at random
   offsets (unaligned; then the same with 64 KiB-aligned offsets). nf: TCP `bytes_sent` of the
   active's channel socket (from `ss -tin`; includes TLS, framing and heartbeats). rsync: its own
   `--stats` "Total bytes sent" with `--no-whole-file` over its daemon on loopback.
4. memory -- the agents' peak RSS (VmHWM, and sampled VmRSS) and start-up times while protecting
   100,000 small files.

`--quick` shrinks every data set and the lag run (sizes are printed with the results).
Everything runs in a work directory under /tmp that is removed at the end; only generated source
data is cached under bench/out/cache (git-ignored).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inotify_simple import INotify, flags  # noqa: E402

from engine.client import Connection, request  # noqa: E402
from engine.config import load_cluster, load_node  # noqa: E402
from engine.errors import NfError  # noqa: E402
from nftui import demo as nfdemo  # noqa: E402

NF = [sys.executable, "-m", "nftui"]
CACHE = REPO / "bench" / "out" / "cache"
MIB = 1 << 20
CHANNEL_PORT = 7780
RSYNC_PORT = 18730
TLS_PIPE_PORT = 18731


# -- sizes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    big_files: int
    big_mib: int
    small_files: int
    small_dirs: int
    lag_seconds: float
    lag_rate: int
    delta_mib: int
    memory_files: int
    sync_rounds: int

    @property
    def label(self) -> str:
        return "quick" if self.big_files < 8 else "full"


FULL = Sizes(8, 128, 20_000, 200, 20.0, 200, 1024, 100_000, 5)  # 5 rounds: each tool once in each place
QUICK = Sizes(2, 128, 5_000, 50, 10.0, 200, 256, 20_000, 1)


# -- small helpers -----------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def tree_stats(root: Path) -> tuple[int, int]:
    """(regular files, total bytes) below root, ignoring nf's staging directory."""
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".nf-stage"]
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:  # a sync tool's temporary file, renamed meanwhile
                continue
            files += 1
            size += st.st_size
    return files, size


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def ensure_tools() -> None:
    """Install rsync, lsyncd and socat with apt when missing (we run as root); byte-compile nf."""
    # nf byte-compiled, as an installed package is (scripts/setup.sh does the same): agents are
    # timed from their start, which would otherwise include compiling nf's sources.
    run([sys.executable, "-m", "compileall", "-q", str(REPO / "engine"), str(REPO / "nftui")])
    if shutil.which("rsync") and shutil.which("lsyncd") and shutil.which("socat"):
        return
    cmd = ["apt-get", "install", "-y", "rsync", "lsyncd", "socat"]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        run(["apt-get", "update"])
        run(cmd)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# -- source data -------------------------------------------------------------------------------
def write_random(path: Path, size: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MIB)
            f.write(rng.randbytes(n))
            left -= n


def sync_dataset(s: Sizes) -> Path:
    """Large random files plus many small ones, generated once and reused."""
    root = CACHE / f"sync-{s.big_files}x{s.big_mib}M-{s.small_files}"
    stamp = root / ".complete"
    if stamp.exists():
        return root / "data"
    shutil.rmtree(root, ignore_errors=True)
    log(f"generating {root} (once)")
    rng = random.Random(1)
    for i in range(s.big_files):
        write_random(root / "data" / "big" / f"b{i}.bin", s.big_mib * MIB, rng)
    per_dir = s.small_files // s.small_dirs
    for d in range(s.small_dirs):
        folder = root / "data" / "small" / f"d{d:03d}"
        folder.mkdir(parents=True)
        for i in range(per_dir):
            (folder / f"f{i:03d}").write_bytes(rng.randbytes(rng.randint(1024, 8192)))
    stamp.touch()
    return root / "data"


def big_file(mib: int) -> Path:
    path = CACHE / f"delta-{mib}M.bin"
    if not path.exists():
        log(f"generating {path} (once)")
        write_random(path.with_suffix(".tmp"), mib * MIB, random.Random(2))
        path.with_suffix(".tmp").rename(path)
    return path


def many_small_files(root: Path, count: int, per_dir: int = 100) -> None:
    rng = random.Random(3)
    for d in range(count // per_dir):
        folder = root / f"d{d:04d}"
        folder.mkdir(parents=True)
        for i in range(per_dir):
            (folder / f"f{i:03d}").write_bytes(rng.randbytes(rng.randint(256, 2048)))


# -- the nf demo cluster -----------------------------------------------------------------------
class Cluster:
    """A two-node nf demo cluster in `workdir`, driven through the real CLI and agent socket."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.config = workdir / "cluster.toml"
        self.up_proc: subprocess.Popen[str] | None = None
        self._sockets: dict[str, Path] = {}
        self._conns: dict[str, Connection] = {}

    def create(self, replication: dict[str, Any] | None = None) -> None:
        nfdemo.create(self.workdir, 2)
        if replication:
            text = self.config.read_text()
            body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in replication.items())
            text = re.sub(r"^\[replication\].*$", "[replication]\n" + body, text, flags=re.M)
            self.config.write_text(text)
        self.data("primary").mkdir(parents=True, exist_ok=True)

    def data(self, node: str) -> Path:
        return self.workdir / node / "srv" / "data"

    def host(self, node: str) -> str:
        cluster = load_cluster(self.config)
        return cluster.node(node).channel_host

    def spawn_up(self) -> None:
        self.up_proc = subprocess.Popen([*NF, "demo", "up", "--workdir", str(self.workdir), "--nodes", "2", "--json"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def up(self) -> None:
        self.spawn_up()
        assert self.up_proc is not None
        _, err = self.up_proc.communicate(timeout=300)
        if self.up_proc.returncode:
            raise RuntimeError(f"nf demo up failed: {err}")

    def down(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        if self.up_proc is not None and self.up_proc.poll() is None:
            self.up_proc.kill()
            self.up_proc.wait()
        subprocess.run([*NF, "demo", "down", "--workdir", str(self.workdir)], capture_output=True, timeout=120)

    def pid(self, node: str) -> int | None:
        return nfdemo.pid_of(self.workdir, node)

    def status(self, node: str = "primary") -> dict[str, Any] | None:
        """The agent's status, or None while it does not answer yet. Asked on a kept connection:
        polled every 20 ms, a new connection each time cost the agent 5 % of a core."""
        if node not in self._conns:
            self._conns[node] = Connection(self.socket(node), timeout=5)
        try:
            return self._conns[node].request("status")
        except (NfError, OSError, ValueError):
            self._conns.pop(node).close()
            return None

    def socket(self, node: str) -> Path:
        """The agent's API socket, read from the config once: polling must not steal the CPU it measures."""
        if node not in self._sockets:
            self._sockets[node] = load_node(self.workdir / node / "node.toml", load_cluster(self.config)).socket
        return self._sockets[node]

    @staticmethod
    def connected(st: dict[str, Any] | None) -> bool:
        return bool(st) and all(n["connected"] and n["role"] != "unknown" for n in st["nodes"])  # type: ignore[index]

    @staticmethod
    def level(st: dict[str, Any] | None, min_seq: int = 0) -> bool:
        """The active reports the passive level: nothing queued, not syncing, same applied sequence."""
        if not Cluster.connected(st):
            return False
        nodes = {n["id"]: n for n in st["nodes"]}  # type: ignore[index]
        p, s = nodes["primary"], nodes["secondary"]
        return (p["role"] == "active" and p["applied_seq"] >= min_seq and s["send_queue_bytes"] == 0
                and not s.get("syncing") and s["applied_seq"] == p["applied_seq"])

    def wait_baseline(self, timeout: float, node: str = "primary") -> None:
        """Until the active has recorded its new journal's baseline (its start-up walk)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if any(e["kind"] == "baseline" for e in request(self.socket(node), "events", timeout=5, limit=50)):
                    return
            except (NfError, OSError, ValueError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the {node} agent did not start within {timeout:.0f} s; see {self.workdir}/{node}/agent.log")

    def trees_agree(self) -> bool:
        return tree_stats(self.data("primary")) == tree_stats(self.data("secondary"))

    def wait_level(self, timeout: float, min_seq: int = 0, check: Callable[[], bool] | None = None,
                   tick: Callable[[], None] | None = None) -> float:
        """Poll until level (confirmed by `check`); return the monotonic time level was first seen."""
        check = check or self.trees_agree
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if tick:
                tick()
            now = time.monotonic()
            st = self.status()
            if st is not None and st["role"] == "passive":  # stepped down: something went wrong
                raise RuntimeError(f"the primary is no longer active ({st['role']} at epoch {st['epoch']}); "
                                   f"see {self.workdir}/*/agent.log")
            if self.level(st, min_seq) and check():
                return now
            time.sleep(0.02)
        raise TimeoutError(f"nf did not reach level within {timeout:.0f} s; see {self.workdir}/*/agent.log")

    def journal_seq(self) -> int:
        st = self.status()
        assert st is not None
        return next(n["applied_seq"] for n in st["nodes"] if n["id"] == "primary")


@contextmanager
def nf_cluster(base: Path, name: str, replication: dict[str, Any] | None = None) -> Iterator[Cluster]:
    c = Cluster(base / name)
    c.create(replication)
    try:
        yield c
    finally:
        c.down()
        keep_log(c)


def keep_log(c: Cluster) -> None:
    """Copy the agent logs next to the JSON output, so slowness can be traced after cleanup."""
    dest = REPO / "bench" / "out" / "logs" / c.workdir.name
    dest.mkdir(parents=True, exist_ok=True)
    for node in ("primary", "secondary"):
        src = c.workdir / node / "agent.log"
        if src.exists():
            shutil.copy(src, dest / f"{node}.log")


def proc_cpu_s(pid: int | None) -> float:
    """CPU seconds (user and system) a process and its waited-for children have used."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_mem_kib(pid: int | None, key: str) -> int:
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


# -- rsync daemon ------------------------------------------------------------------------------
@contextmanager
def rsync_daemon(base: Path, dest: Path) -> Iterator[tuple[str, int]]:
    """An rsync daemon on 127.0.0.1 serving `dest` as module `dst`; yields the URL and its pid."""
    conf = base / "rsyncd.conf"
    conf.write_text(f"port = {RSYNC_PORT}\naddress = 127.0.0.1\nuse chroot = false\npid file = {base}/rsyncd.pid\n"
                    f"[dst]\npath = {dest}\nread only = false\nuid = root\ngid = root\n")
    proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", RSYNC_PORT), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"rsync://127.0.0.1:{RSYNC_PORT}/dst/", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- 1. initial sync ---------------------------------------------------------------------------
def bench_sync(s: Sizes, base: Path) -> dict[str, Any]:
    """Rounds of every tool, each round in a rotated order, reporting each tool's median: a
    virtual machine's first touch of fresh memory and the disk's mood make a single run, and
    whoever runs first in it, noisy."""
    src = sync_dataset(s)
    files, size = tree_stats(src)
    out: dict[str, Any] = {"files": files, "bytes": size, "page_cache": "dropped before every run",
                           "rounds": s.sync_rounds}
    commands = baseline_commands(src, base)
    tools = ["nf", *commands]
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in tools}
    for r in range(s.sync_rounds):
        for tool in tools[r % len(tools):] + tools[: r % len(tools)]:
            if tool == "nf":
                runs[tool].append(sync_nf(src, base, f"sync-{r}"))
            else:
                runs[tool].append(sync_baseline(tool, commands[tool], src, base / f"baseline-{r}-{tools.index(tool)}"))
    for tool, results in runs.items():
        out[tool] = {k: statistics.median(x[k] for x in results) for k in results[0]}
        out[tool]["runs"] = [round(x["seconds"], 2) for x in results]
    return out


def sync_nf(src: Path, base: Path, name: str) -> dict[str, float]:
    """A new passive joining a running active: the active is a daemon that is up before the
    clock starts (as rsync's daemon is), the passive's start-up and connection are timed."""
    with nf_cluster(base, name) as c:
        run(["cp", "-a", f"{src}/.", str(c.data("primary"))])
        nfdemo.start(c.workdir, "primary")
        c.wait_baseline(120)
        drop_caches()
        # The program is cached, not the data: as for cp and rsync, whose binaries are a few
        # hundred KiB against the interpreter's and packages' tens of MiB.
        run([sys.executable, "-c", "import engine.agent, nftui.cli"], cwd=REPO)
        log("sync: nf")
        active_cpu = proc_cpu_s(c.pid("primary"))
        t0 = time.monotonic()
        nfdemo.start(c.workdir, "secondary")
        marks: dict[str, float] = {}

        def tick() -> None:
            if "connected" not in marks and Cluster.connected(c.status()):
                marks["connected"] = time.monotonic()

        t_level = c.wait_level(3600, tick=tick)
        cpu = proc_cpu_s(c.pid("primary")) - active_cpu + proc_cpu_s(c.pid("secondary"))  # both agents
        return {"seconds": t_level - t0, "passive_connected_s": marks.get("connected", t_level) - t0, "cpu_s": cpu}


def baseline_commands(src: Path, base: Path) -> dict[str, Callable[[Path], list[str]]]:
    """The baselines' command lines, by name; "URL" stands for the rsync daemon's module."""
    return {
        "cp -a": lambda dst: ["cp", "-a", f"{src}/.", str(dst)],
        "rsync -a (local)": lambda dst: ["rsync", "-a", f"{src}/", f"{dst}/"],
        "rsync -a (daemon, loopback)": lambda _dst: ["rsync", "-a", f"{src}/", "URL"],
        "tar over TLS (socat, loopback)": lambda dst: tls_pipe(src, dst, tls_pair(base)),
    }


def tls_pair(base: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate and key for 127.0.0.1, made once per run (outside any clock)."""
    cert, key = base / "tls-pipe.crt", base / "tls-pipe.key"
    if not cert.exists():
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-days", "2"])
    return cert, key


def tls_pipe(src: Path, dst: Path, pair: tuple[Path, Path]) -> list[str]:
    """A reference, not a target: the least an encrypted copy between two nodes does, in native
    code. tar streams the tree through one mutually authenticated TLS 1.3 connection on loopback
    (socat and OpenSSL, as nf's channel uses) into tar on the other end: no hashing, no
    durability, no per-file protocol. The gap from `rsync -a` to this row is what encryption
    costs on this machine; the gap from this row to nf is what nf's own work costs."""
    cert, key = pair
    tls = f"cert={cert},key={key},cafile={cert},verify=1"
    return ["bash", "-c",
            f"set -eo pipefail; socat -b 1048576 -u OPENSSL-LISTEN:{TLS_PIPE_PORT},reuseaddr,{tls} - "
            f"| tar x -b 2048 -C {dst} & receiver=$!; tar c -b 2048 -C {src} . "
            f"| socat -b 1048576 -u - OPENSSL:127.0.0.1:{TLS_PIPE_PORT},{tls},retry=500,interval=0.01; "
            "wait $receiver"]


def sync_baseline(name: str, cmd: Callable[[Path], list[str]], src: Path, dst: Path) -> dict[str, float]:
    """One baseline run into a new `dst`, kept until the whole run ends: ext4 makes file creation
    slow for minutes after many files were deleted (it skips recently freed inodes), so deleting
    one run's copy before the next would handicap whoever runs next."""
    dst.mkdir()
    log(f"sync: {name}")
    with rsync_daemon(dst.parent, dst) as (url, daemon):
        argv = [url if a == "URL" else a for a in cmd(dst)]
        drop_caches()
        cpu0 = children_cpu_s() + proc_cpu_s(daemon)
        t0 = time.monotonic()
        run(argv)
        t1 = time.monotonic()
        os.sync()
        t2 = time.monotonic()
        # The daemon serves each connection in a child, counted once it has reaped that child.
        deadline = time.monotonic() + 10
        while Path(f"/proc/{daemon}/task/{daemon}/children").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu = children_cpu_s() + proc_cpu_s(daemon) - cpu0  # the tool's processes, and the daemon's side
    if tree_stats(src) != tree_stats(dst):
        raise RuntimeError(f"{name} left a different tree")
    return {"seconds": t1 - t0, "seconds_with_sync": t2 - t0, "cpu_s": cpu}


# -- 2. lag ------------------------------------------------------------------------------------
LAG_FILES = 200


class LagProbe:
    """Writer (fixed rate, by deadline) and inotify watcher (on the destination) sharing one clock."""

    def __init__(self, src: Path, dst: Path, rate: int, seconds: float) -> None:
        self.src, self.dst, self.rate, self.seconds = src, dst, rate, seconds
        self.pending: dict[str, list[tuple[int, float]]] = {}
        self.lags: list[float] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.max_behind = 0.0
        self.rng = random.Random(4)

    @staticmethod
    def prepare(src: Path) -> None:
        src.mkdir(parents=True, exist_ok=True)
        for i in range(LAG_FILES):
            (src / f"f{i:03d}").write_bytes(b"0\n" + b"x" * 1024)

    def target(self, i: int) -> str:
        """Even writes overwrite one of the existing files, odd writes create a new file."""
        return f"f{(i // 2) % LAG_FILES:03d}" if i % 2 == 0 else f"c{i:06d}"

    def write(self, i: int) -> None:
        name = self.target(i)
        with open(self.src / name, "wb") as f:
            f.write(f"{i + 1}\n".encode() + self.rng.randbytes(self.rng.randint(1024, 8192)))
        t = time.monotonic()
        with self.lock:
            self.pending.setdefault(name, []).append((i + 1, t))

    def writer(self) -> None:
        t0 = time.monotonic()
        for i in range(int(self.rate * self.seconds)):
            due = t0 + i / self.rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                self.max_behind = max(self.max_behind, now - due)
            self.write(i)

    def observe(self, name: str, now: float) -> None:
        try:
            with open(self.dst / name, "rb") as f:
                seq = int(f.readline())
        except (OSError, ValueError):
            return
        with self.lock:
            waiting = self.pending.get(name)
            if not waiting:
                return
            keep = [(q, t) for q, t in waiting if q > seq]
            self.lags.extend(now - t for q, t in waiting if q <= seq)
            self.pending[name] = keep

    def watcher(self, ino: INotify) -> None:
        while not self.stop.is_set():
            for ev in ino.read(timeout=100):
                if ev.name and not ev.name.startswith("."):
                    self.observe(ev.name, time.monotonic())

    def outstanding(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.pending.values())

    def run(self, drain_timeout: float) -> dict[str, Any]:
        ino = INotify()
        ino.add_watch(str(self.dst), flags.CLOSE_WRITE | flags.MOVED_TO)
        watch = threading.Thread(target=self.watcher, args=(ino,), daemon=True)
        watch.start()
        self.writer()
        deadline = time.monotonic() + drain_timeout
        while self.outstanding() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop.set()
        watch.join()
        ino.close()
        lags_ms = [x * 1000 for x in self.lags]
        return {"writes": int(self.rate * self.seconds), "arrived": len(lags_ms), "missing": self.outstanding(),
                "p50_ms": percentile(lags_ms, 50), "p99_ms": percentile(lags_ms, 99),
                "max_ms": max(lags_ms, default=float("nan")), "mean_ms": statistics.fmean(lags_ms) if lags_ms else None,
                "writer_max_behind_ms": self.max_behind * 1000}


def bench_lag(s: Sizes, base: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"rate_per_s": s.lag_rate, "seconds": s.lag_seconds}
    with nf_cluster(base, "lag") as c:
        LagProbe.prepare(c.data("primary") / "lag")
        c.up()
        c.wait_level(300)
        log("lag: nf")
        out["nf"] = LagProbe(c.data("primary") / "lag", c.data("secondary") / "lag", s.lag_rate, s.lag_seconds).run(60)
    for label, delay in (("lsyncd (default delay)", None), ("lsyncd (delay = 1)", 1)):
        log(f"lag: {label}")
        out[label] = lag_lsyncd(base, delay, s)
    return out


def lag_lsyncd(base: Path, delay: int | None, s: Sizes) -> dict[str, Any]:
    src, dst = base / "lsync-src", base / "lsync-dst"
    for d in (src, dst):
        shutil.rmtree(d, ignore_errors=True)
    LagProbe.prepare(src)
    dst.mkdir()
    conf = base / "lsyncd.lua"
    extra = f", delay = {delay}" if delay is not None else ""
    conf.write_text(f'settings {{ nodaemon = true, logfile = "{base}/lsyncd.log" }}\n'
                    f'sync {{ default.rsync, source = "{src}", target = "{dst}"{extra} }}\n')
    proc = subprocess.Popen(["lsyncd", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while tree_stats(dst)[0] < LAG_FILES:  # lsyncd's start-up full sync
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"lsyncd did not do its initial sync; see {base}/lsyncd.log")
            time.sleep(0.05)
        return LagProbe(src, dst, s.lag_rate, s.lag_seconds).run(120)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


# -- 3. delta ----------------------------------------------------------------------------------
WRITES, WRITE_SIZE = 160, 64 << 10


def edit_plan(size: int, aligned: bool, seed: int) -> list[tuple[int, bytes]]:
    """160 non-overlapping 64 KiB writes at random offsets, with random data (1 % of 1 GiB)."""
    rng = random.Random(seed)
    slots = size // (2 * WRITE_SIZE)
    chosen = sorted(rng.sample(range(slots), WRITES))
    plan = []
    for slot in chosen:
        offset = slot * 2 * WRITE_SIZE + (0 if aligned else rng.randrange(1, WRITE_SIZE, 512) + 123)
        plan.append((offset, rng.randbytes(WRITE_SIZE)))
    return plan


def apply_edit(path: Path, plan: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in plan:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def channel_bytes(dst_host: str) -> tuple[int, int]:
    """(bytes_sent, bytes_received) of the active's TCP socket to the passive's channel port.

    The active dials the passive (ids sort "primary" < "secondary"), so its end of the link is the
    one socket whose peer is the passive's channel address; its source address is the kernel's choice.
    """
    text = run(["ss", "-tinH", "state", "established", "dst", f"{dst_host}:{CHANNEL_PORT}"]).stdout
    sent = re.findall(r"bytes_sent:(\d+)", text)
    received = re.findall(r"bytes_received:(\d+)", text)
    if len(sent) != 1:
        raise RuntimeError(f"expected one channel socket to {dst_host}:{CHANNEL_PORT}, got:\n{text}")
    return int(sent[0]), int(received[0]) if received else 0


def bench_delta(s: Sizes, base: Path) -> dict[str, Any]:
    original = big_file(s.delta_mib)
    size = original.stat().st_size
    plans = {"scattered, unaligned": edit_plan(size, False, 5), "scattered, 64 KiB-aligned": edit_plan(size, True, 6)}
    changed = WRITES * WRITE_SIZE
    out: dict[str, Any] = {"file_bytes": size, "changed_bytes": changed, "cases": {}}
    nf_res = delta_nf(original, plans, base)
    rs_res = delta_rsync(original, plans, base)
    for case in plans:
        out["cases"][case] = {"nf": nf_res[case], "rsync --no-whole-file (daemon)": rs_res[case]}
    return out


def delta_nf(original: Path, plans: dict[str, list[tuple[int, bytes]]], base: Path) -> dict[str, dict[str, Any]]:
    res: dict[str, dict[str, Any]] = {}
    with nf_cluster(base, "delta") as c:
        target = c.data("primary") / "big.bin"
        shutil.copy2(original, target)
        c.up()
        c.wait_level(1800)
        s_host = c.host("secondary")
        for case, plan in plans.items():
            log(f"delta: nf, {case}")
            time.sleep(1.0)
            seq = c.journal_seq()
            before = channel_bytes(s_host)
            t0 = time.monotonic()
            apply_edit(target, plan)
            c.wait_level(600, min_seq=seq + 1,
                         check=lambda: file_digest(target) == file_digest(c.data("secondary") / "big.bin"))
            seconds = time.monotonic() - t0
            after = channel_bytes(s_host)
            res[case] = {"bytes_sent": after[0] - before[0], "bytes_received": after[1] - before[1],
                         "seconds": seconds}
    return res


def delta_rsync(original: Path, plans: dict[str, list[tuple[int, bytes]]], base: Path) -> dict[str, dict[str, Any]]:
    src, dst = base / "delta-src", base / "delta-dst"
    for d in (src, dst):
        d.mkdir()
        shutil.copy2(original, d / "big.bin")
    res: dict[str, dict[str, Any]] = {}
    try:
        with rsync_daemon(base, dst) as (url, _):
            for case, plan in plans.items():
                log(f"delta: rsync, {case}")
                apply_edit(src / "big.bin", plan)
                t0 = time.monotonic()
                text = run(["rsync", "-a", "--no-whole-file", "--stats", f"{src}/", url]).stdout
                seconds = time.monotonic() - t0
                sent = int(re.search(r"Total bytes sent: ([\d,]+)", text).group(1).replace(",", ""))  # type: ignore[union-attr]
                recv = int(re.search(r"Total bytes received: ([\d,]+)", text).group(1).replace(",", ""))  # type: ignore[union-attr]
                if file_digest(src / "big.bin") != file_digest(dst / "big.bin"):
                    raise RuntimeError("rsync left a different file")
                res[case] = {"bytes_sent": sent, "bytes_received": recv, "seconds": seconds}
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    return res


# -- 4. memory and start-up --------------------------------------------------------------------
def bench_memory(s: Sizes, base: Path) -> dict[str, Any]:
    with nf_cluster(base, "memory") as c:
        log(f"memory: creating {s.memory_files} files")
        many_small_files(c.data("primary"), s.memory_files)
        drop_caches()
        log("memory: nf")
        peak = {"primary": 0, "secondary": 0}
        marks: dict[str, float] = {}
        t0 = time.monotonic()
        c.spawn_up()

        def tick() -> None:
            for node in peak:
                peak[node] = max(peak[node], proc_mem_kib(c.pid(node), "VmRSS"))
            st = c.status()
            if st is not None:
                marks.setdefault("answer", time.monotonic())
            if Cluster.connected(st):
                marks.setdefault("connected", time.monotonic())

        t_level = c.wait_level(3600, tick=tick)
        hwm = {node: proc_mem_kib(c.pid(node), "VmHWM") for node in peak}
        return {"files": s.memory_files,
                "primary_peak_rss_mib": max(hwm["primary"], peak["primary"]) / 1024,
                "secondary_peak_rss_mib": max(hwm["secondary"], peak["secondary"]) / 1024,
                "startup_answer_s": marks.get("answer", t_level) - t0,
                "startup_connected_s": marks.get("connected", t_level) - t0,
                "level_s": t_level - t0}


# -- report ------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "✅" if ok else "❌"


def report(results: dict[str, Any], s: Sizes) -> str:
    rows: list[tuple[str, str, str, str]] = []
    if "sync" in results:
        rows += sync_rows(results["sync"])
    if "lag" in results:
        rows += lag_rows(results["lag"])
    if "delta" in results:
        rows += delta_rows(results["delta"])
    if "memory" in results:
        rows += memory_rows(results["memory"])
    lines = [f"Replication benchmark ({s.label} run, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
             f"`{os.uname().release}`); page cache dropped before every sync run.", "",
             "| Measurement | nf | Baseline(s) | Target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def sync_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    nf_s = r["nf"]["seconds"]
    cp, rs = r["cp -a"]["seconds"], r["rsync -a (local)"]["seconds"]
    base = "; ".join(f"{k} {v['seconds']:.1f} s ({v['seconds_with_sync']:.1f} s incl. sync; {v['cpu_s']:.1f} CPU-s)"
                     for k, v in r.items() if isinstance(v, dict) and "seconds_with_sync" in v)
    what = (f"Initial sync, {r['bytes'] / (1 << 30):.2f} GiB in {r['files']:,} files "
            f"(median of {r.get('rounds', 1)} rounds)")
    # nf's time includes making its copy durable; beside each verdict, the ratio to the baseline's
    # copy once it is on disk too.
    cp_sync, rs_sync = r["cp -a"]["seconds_with_sync"], r["rsync -a (local)"]["seconds_with_sync"]
    target = (f"≤ rsync -a {verdict(nf_s <= rs)} (×{nf_s / rs:.2f}; ×{nf_s / rs_sync:.2f} of its durable copy); "
              f"≤ 1.5 × cp -a {verdict(nf_s <= 1.5 * cp)} (×{nf_s / cp:.2f}; ×{nf_s / cp_sync:.2f} of its durable copy)")
    nf_txt = (f"{nf_s:.1f} s ({r['nf']['cpu_s']:.1f} CPU-s in both agents; passive start-up until "
              f"connected {r['nf']['passive_connected_s']:.1f} s)")
    return [(what, nf_txt, base, target)]


def lag_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    n = r["nf"]

    def fmt(x: dict[str, Any]) -> str:
        miss = f", {x['missing']} never arrived" if x["missing"] else ""
        return f"p50 {x['p50_ms']:.0f} ms / p99 {x['p99_ms']:.0f} ms{miss}"

    base = "; ".join(f"{k}: {fmt(v)}" for k, v in r.items() if k.startswith("lsyncd"))
    what = f"Lag, {r['rate_per_s']} writes/s for {r['seconds']:.0f} s"
    target = (f"p50 < 50 ms {verdict(n['p50_ms'] < 50)}; p99 < 250 ms "
              f"{verdict(n['p99_ms'] < 250 and not n['missing'])}")
    return [(what, fmt(n), base, target)]


def delta_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    changed = r["changed_bytes"]
    for case, v in r["cases"].items():
        n, rs = v["nf"], v["rsync --no-whole-file (daemon)"]
        what = (f"Bytes sent, 1 % edit of a {r['file_bytes'] / (1 << 30):.2f} GiB file ({case}, "
                f"{changed / MIB:.0f} MiB changed)")
        nf_txt = (f"{n['bytes_sent'] / MIB:.1f} MiB = ×{n['bytes_sent'] / changed:.2f} "
                  f"(+{n['bytes_received'] / 1024:.0f} KiB back)")
        rs_txt = (f"rsync --no-whole-file: {rs['bytes_sent'] / MIB:.1f} MiB = ×{rs['bytes_sent'] / changed:.2f} "
                  f"(+{rs['bytes_received'] / 1024:.0f} KiB back)")
        rows.append((what, nf_txt, rs_txt, f"≤ 1.2 × changed {verdict(n['bytes_sent'] <= 1.2 * changed)}"))
    return rows


def memory_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    what = f"Agent memory and start-up, {r['files']:,} files"
    nf_txt = (f"primary peak RSS {r['primary_peak_rss_mib']:.0f} MiB (secondary {r['secondary_peak_rss_mib']:.0f} MiB); "
              f"answers {r['startup_answer_s']:.1f} s, connected {r['startup_connected_s']:.1f} s, "
              f"level {r['level_s']:.1f} s")
    return [(what, nf_txt, "–", f"< 200 MB {verdict(r['primary_peak_rss_mib'] * MIB < 200e6)}")]


def engine_version() -> str:
    """The commit measured, marked dirty when engine/ has uncommitted changes (read-only git)."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "engine"],
                           capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# -- main --------------------------------------------------------------------------------------
PARTS: dict[str, Callable[[Sizes, Path], dict[str, Any]]] = {
    "sync": bench_sync, "lag": bench_lag, "delta": bench_delta, "memory": bench_memory}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller data sets and a 10 s lag run")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of: " + ",".join(PARTS))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "replication.json")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        ap.error("run as root (drops the page cache)")
    sizes = QUICK if args.quick else FULL
    ensure_tools()
    CACHE.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="nf-bench-", dir="/tmp"))
    results: dict[str, Any] = {"sizes": asdict(sizes), "engine": engine_version(),
                               "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    try:
        for part in parts:
            results[part] = PARTS[part](sizes, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results, sizes))
    print(f"\nEngine {results['engine']}; JSON in {args.out}; agent logs in bench/out/logs/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
