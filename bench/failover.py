"""Failover benchmark: nf against keepalived on the namespace testbed, in one run.

Usage: python bench/failover.py [--trials 20] [--saturate 60] [--out bench/out/failover.json]

What is measured (root; network namespaces; keepalived from Debian, installed when missing):

1. downtime -- client-observed: from the moment the active node dies (every process in its
   namespace SIGKILLed, its links set down) until the client namespace's first successful HTTP
   request to the public address. The client polls every 50 ms with a 0.3 s timeout. nf runs
   with its defaults; keepalived with `advert_int 1`, moving the same address between the same
   namespaces, an HTTP server running on both nodes. After each trial the dead node comes back
   (as passive / backup) and, for nf, the next trial starts once it is level again.
2. false failovers -- for `--saturate` seconds the active's CPUs are saturated (one busy process
   per CPU) while nf runs with its defaults; any role change counts.
3. switchover -- nf's own reported unavailability and lost records for a planned switchover.
4. failback -- after a failover, 1 % of a 200 MiB data set changes on the new active at once; the
   old node comes back and is brought level (bytes the new active sent on the channel, against
   bytes changed), then a switchover returns the service to it.

The testbed is tests/netbed.py, the same one the failover tests use.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import wait_for  # noqa: E402
from netbed import NODES, PORT, PUBLIC, NetBed, ip  # noqa: E402


SETTLE = 5.0  # seconds of VRRP adverts (advert_int 1) before each keepalived trial


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def client_downtime(bed: NetBed, path: str, expect: str, t0: float, limit: float = 60.0) -> float:
    while time.monotonic() - t0 < limit:
        if bed.fetch(path, timeout=0.3) == expect:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError(f"the client was not served within {limit:.0f} s")


def revive(bed: NetBed, node: str) -> None:
    ip("-n", bed.ns[node], "link", "set", "eth0", "up")
    ip("-n", bed.ns[node], "link", "set", "ch0", "up")


# -- nf ------------------------------------------------------------------------------------------
def nf_trials(base: Path, trials: int, heartbeat: str) -> dict[str, Any]:
    bed = NetBed(base / "nf")
    bed.workdir.mkdir(parents=True)
    bed.up()
    try:
        bed.create(heartbeat)
        bed.start("primary")
        wait_for(lambda: bed.role("primary") == "active", 30)
        bed.start("secondary")
        (bed.data("primary") / "index.txt").write_text("nf\n")
        wait_for(lambda: bed.fetch("index.txt") == "nf\n" and level(bed, "primary"), 60)
        downtimes = []
        active = "primary"
        for i in range(trials):
            passive = next(n for n in NODES if n != active)
            t0 = time.monotonic()
            bed.crash(active)
            downtimes.append(client_downtime(bed, "index.txt", "nf\n", t0))
            log(f"nf trial {i + 1}: {downtimes[-1]:.2f} s")
            revive(bed, active)
            bed.start(active)
            wait_for(lambda a=active: bed.role(a) == "passive" and level(bed, passive), 60)
            active = passive
        return {"downtime_s": downtimes, "p50": statistics.median(downtimes), "p99": percentile(downtimes, 0.99)}
    finally:
        bed.down()


def level(bed: NetBed, active: str) -> bool:
    try:
        st = bed.status(active)
    except Exception:
        return False
    head = next(n for n in st["nodes"] if n["id"] == active)["applied_seq"]
    return st["role"] == "active" and all(n["connected"] and not n.get("syncing") and n.get("send_queue_bytes", 0) == 0
                                          and n["applied_seq"] == head for n in st["nodes"])


def nf_saturated(base: Path, seconds: float, heartbeat: str) -> dict[str, Any]:
    bed = NetBed(base / "nf-cpu")
    bed.workdir.mkdir(parents=True)
    bed.up()
    burners: list[multiprocessing.Process] = []
    try:
        bed.create(heartbeat)
        bed.start("primary")
        wait_for(lambda: bed.role("primary") == "active", 30)
        bed.start("secondary")
        wait_for(lambda: level(bed, "primary"), 60)
        burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(os.cpu_count() or 1)]
        for b in burners:
            b.start()
        changes = 0
        roles = {n: bed.role(n) for n in NODES}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            now = {n: bed.role(n) for n in NODES}
            changes += sum(1 for n in NODES if now[n] is not None and roles[n] is not None and now[n] != roles[n])
            roles = {n: now[n] or roles[n] for n in NODES}
            time.sleep(0.2)
        return {"seconds": seconds, "burners": len(burners), "false_failovers": changes}
    finally:
        for b in burners:
            b.kill()
        bed.down()


def _burn() -> None:
    while True:
        pass


def nf_switchover(base: Path) -> dict[str, Any]:
    bed = NetBed(base / "nf-switch")
    bed.workdir.mkdir(parents=True)
    bed.up()
    try:
        bed.create()
        bed.start("primary")
        wait_for(lambda: bed.role("primary") == "active", 30)
        bed.start("secondary")
        for i in range(200):
            (bed.data("primary") / f"s{i:03d}").write_bytes(os.urandom(4096))
        wait_for(lambda: level(bed, "primary"), 60)
        out = subprocess.run([sys.executable, "-m", "nftui", "switchover", "--config", str(bed.config), "--json"],
                             capture_output=True, text=True, check=True, cwd=REPO)
        r = json.loads(out.stdout)
        return {"unavailable_s": r["unavailable_seconds"], "lost_records": r["lost_records"]}
    finally:
        bed.down()


def channel_sent(bed: NetBed, node: str) -> int:
    """Bytes `node` sent on its channel link (the peer dials it: its end listens on port 7780)."""
    text = subprocess.run(["ip", "netns", "exec", bed.ns[node], "ss", "-tinH", "state", "established",
                           "sport", "= :7780"], capture_output=True, text=True, check=True).stdout
    return sum(int(n) for n in re.findall(r"bytes_sent:(\d+)", text))


def nf_failback(base: Path, files: int = 20, mib: int = 10) -> dict[str, Any]:
    """Fail over, change 1 % on the new active, bring the old node back once that is journaled, fail back.

    Bytes sent to the returning node are counted on the new active's end of the channel (TLS,
    framing and heartbeats included) until it is level, against the bytes that changed. The old
    node comes back at once, while the edits are still being journaled: what it receives then is
    streamed, so this also measures that a promoted node journals changed blocks rather than
    whole files (it kept the block hashes of what it applied as a passive, see engine/held.py;
    without them this was ×17-28).
    """
    bed = NetBed(base / "nf-failback")
    bed.workdir.mkdir(parents=True)
    bed.up()
    rng = random.Random(7)
    try:
        bed.create()
        bed.start("primary")
        wait_for(lambda: bed.role("primary") == "active", 30)
        bed.start("secondary")
        for i in range(files):
            (bed.data("primary") / f"d{i:02d}.bin").write_bytes(rng.randbytes(mib << 20))
        wait_for(lambda: level(bed, "primary"), 120)
        bed.crash("primary")
        wait_for(lambda: bed.role("secondary") == "active", 30)
        changed = 0
        for i in range(files):  # 1 %: three 64 KiB writes at random offsets in every file
            with open(bed.data("secondary") / f"d{i:02d}.bin", "r+b") as fh:
                for _ in range(3):
                    fh.seek(rng.randrange(0, (mib << 20) - (64 << 10)))
                    fh.write(rng.randbytes(64 << 10))
                    changed += 64 << 10
        revive(bed, "primary")
        bed.start("primary")
        wait_for(lambda: bed.role("primary") == "passive" and level(bed, "secondary"), 120)
        resynced = channel_sent(bed, "secondary")
        out = subprocess.run([sys.executable, "-m", "nftui", "switchover", "--config", str(bed.config), "--to",
                              "primary", "--json"], capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            raise RuntimeError(f"failback switchover failed: {out.stdout}{out.stderr}")
        back = json.loads(out.stdout)
        return {"dataset_bytes": files * (mib << 20), "changed_bytes": changed, "resynced_bytes": resynced,
                "ratio": resynced / changed, "failback_unavailable_s": back["unavailable_seconds"],
                "failback_lost_records": back["lost_records"]}
    finally:
        bed.down()


# -- keepalived ----------------------------------------------------------------------------------
def keepalived_trials(base: Path, trials: int) -> dict[str, Any]:
    if not shutil.which("keepalived"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "keepalived"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True)
    bed = NetBed(base / "ka")
    bed.workdir.mkdir(parents=True)
    bed.up()
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(node: str, priority: int) -> None:
        d = bed.workdir / node
        d.mkdir(exist_ok=True)
        (d / "data").mkdir(exist_ok=True)
        (d / "data" / "index.txt").write_text("ka\n")
        for stale in ("ka.pid", "vrrp.pid"):  # left by a killed daemon; keepalived refuses to start over them
            (d / stale).unlink(missing_ok=True)
        conf = d / "keepalived.conf"
        conf.write_text(f"""global_defs {{ enable_script_security }}
vrrp_instance VI {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int 1
    nopreempt
    virtual_ipaddress {{ {PUBLIC}/24 }}
}}
""")
        procs[node] = subprocess.Popen(
            ["ip", "netns", "exec", bed.ns[node], "keepalived", "--dont-fork", "--log-console", "--vrrp",
             "-f", str(conf), "-p", str(d / "ka.pid"), "-r", str(d / "vrrp.pid")],
            stdout=open(d / "keepalived.log", "ab"), stderr=subprocess.STDOUT)
        subprocess.Popen(["ip", "netns", "exec", bed.ns[node], sys.executable, "-m", "http.server", str(PORT),
                          "--directory", str(d / "data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        start("primary", 150)
        start("secondary", 100)
        wait_for(lambda: bed.fetch("index.txt") == "ka\n", 60)
        downtimes = []
        for i in range(trials):
            # VRRP settles by adverts: let the backup hear several before the master dies, or the
            # backup's start-up timer, not a failover, would be measured
            time.sleep(SETTLE)
            holders = [n for n in NODES if PUBLIC + "/" in ip("-n", bed.ns[n], "-o", "addr").stdout]
            assert len(holders) == 1, f"keepalived left the address on {holders}"
            holder = holders[0]
            t0 = time.monotonic()
            bed.crash(holder)
            procs.pop(holder, None)
            downtimes.append(client_downtime(bed, "index.txt", "ka\n", t0))
            log(f"keepalived trial {i + 1}: {downtimes[-1]:.2f} s")
            revive(bed, holder)
            ip("-n", bed.ns[holder], "addr", "del", f"{PUBLIC}/24", "dev", "eth0", check=False)
            start(holder, 100)  # nopreempt: the revived node joins as backup
        return {"downtime_s": downtimes, "p50": statistics.median(downtimes), "p99": percentile(downtimes, 0.99)}
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGKILL)
        bed.down()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--saturate", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "failover.json")
    ap.add_argument("--heartbeat", default="", help='nf [heartbeat] settings to try instead of the defaults, '
                    'e.g. "interval = 0.2\nfailover_timeout = 1.0"')
    ap.add_argument("--only", default="nf,keepalived,switchover,failback,saturated")
    args = ap.parse_args(argv)
    parts = args.only.split(",")
    hb = args.heartbeat.replace("\\n", "\n")
    if os.geteuid() != 0:
        ap.error("run as root (network namespaces)")
    base = Path(tempfile.mkdtemp(prefix="nf-failover-", dir="/tmp"))
    results: dict[str, Any] = {"trials": args.trials, "heartbeat": hb or "defaults"}
    try:
        if "nf" in parts:
            log("nf: downtime trials")
            results["nf"] = nf_trials(base, args.trials, hb)
        if "keepalived" in parts:
            log("keepalived: downtime trials")
            results["keepalived"] = keepalived_trials(base, args.trials)
        if "switchover" in parts:
            log("nf: switchover")
            results["switchover"] = nf_switchover(base)
        if "failback" in parts:
            log("nf: failback after a 1 % change")
            results["failback"] = nf_failback(base)
        if "saturated" in parts:
            log(f"nf: {args.saturate:.0f} s with the active's CPUs saturated")
            results["saturated"] = nf_saturated(base, args.saturate, hb)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if set(parts) != {"nf", "keepalived", "switchover", "failback", "saturated"}:
        print(json.dumps(results, indent=2))
        return 0
    n, k, fb = results["nf"], results["keepalived"], results["failback"]
    print(f"| Measure | nf (defaults) | keepalived (advert_int 1) | Target |\n|---|---|---|---|\n"
          f"| Client downtime, {args.trials} trials | p50 {n['p50']:.2f} s / p99 {n['p99']:.2f} s | "
          f"p50 {k['p50']:.2f} s / p99 {k['p99']:.2f} s | nf p50 ≤ ½ keepalived p50 "
          f"{'✅' if n['p50'] <= k['p50'] / 2 else '❌'} (×{n['p50'] / k['p50']:.2f}) |\n"
          f"| False failovers, {results['saturated']['seconds']:.0f} s of saturated CPU | "
          f"{results['saturated']['false_failovers']} | – | 0 "
          f"{'✅' if results['saturated']['false_failovers'] == 0 else '❌'} |\n"
          f"| Switchover | unavailable {results['switchover']['unavailable_s']:.2f} s, "
          f"{results['switchover']['lost_records']} records lost | – | 0 lost "
          f"{'✅' if results['switchover']['lost_records'] == 0 else '❌'} |\n"
          f"| Failback after a 1 % change of {fb['dataset_bytes'] >> 20} MiB | sent "
          f"{fb['resynced_bytes'] / (1 << 20):.1f} MiB for {fb['changed_bytes'] / (1 << 20):.1f} MiB changed "
          f"(×{fb['ratio']:.2f}); switchover back {fb['failback_unavailable_s']:.2f} s, "
          f"{fb['failback_lost_records']} lost | – | ∝ change, 0 lost |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
