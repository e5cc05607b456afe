"""Concurrent writers that churn a tree the way applications and operators do, for tests of
replication under load (`test_churn.py`).

Each writer works in a subdirectory of its own, paced so that its share of the byte budget is
spread over the run. Between them they make what the unit tests make one at a time, but
overlapping: new files by `dd` in assorted block sizes, appends to files held open, writes in
place, truncate-and-append, sparse files, same-size rewrites (only the content changes), a file
renamed while open and written, directories renamed while their files are written (their old
names made again at once), and small files created, deleted, renamed, chmodded and symlinked.

Decisions come from a seeded generator, so a seed names a story; the bytes are random and
the timing is the machine's, so a story is not replayed exactly. An error a writer meets racing
itself (a file it renamed a moment before) is counted, not raised: it is not the engine's.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

__all__ = ["Churn"]

_BLOCKS = {"4k": 4096, "13k": 13 * 1024, "64k": 65536, "1M": 1 << 20}


class Churn:
    """Writers in `root` for `seconds`, writing about `total_bytes` between them."""

    def __init__(self, root: Path, seed: int, total_bytes: int, seconds: float) -> None:
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + seconds
        self.writers = [kind(root, random.Random(seed * 1000 + i), int(share * total_bytes), self)
                        for i, (kind, share) in enumerate(_SHARES)]

    def start(self) -> None:
        for w in self.writers:
            w.start()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def join(self) -> None:
        for w in self.writers:
            w.join()

    @property
    def written(self) -> int:
        return sum(w.written for w in self.writers)

    def summary(self) -> str:
        return ", ".join(f"{w.name} {w.ops} ops" + (f" ({len(w.errors)} raced)" if w.errors else "")
                         for w in self.writers)


class _Writer(threading.Thread):
    def __init__(self, root: Path, rng: random.Random, budget: int, churn: Churn) -> None:
        super().__init__(name=type(self).__name__.lstrip("_").lower(), daemon=True)
        self.rng, self.budget, self.churn = rng, budget, churn
        self.dir = root / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.written = 0
        self.ops = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.done():
            try:
                self.step()
                self.ops += 1
            except (OSError, subprocess.CalledProcessError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.01)
        self.finish()

    def done(self) -> bool:
        return time.monotonic() >= self.churn.stop_at

    def pace(self) -> None:
        """Wait while ahead of the budget's schedule (load shaping, not synchronisation)."""
        span = self.churn.stop_at - self.churn.t0
        while not self.done() and self.written > self.budget * min(1.0, self.churn.elapsed() / span):
            time.sleep(0.02)

    def step(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def data(self, n: int) -> bytes:
        self.written += n
        return os.urandom(n)

    def dd(self, *args: str) -> None:
        subprocess.run(["dd", "status=none", *args], check=True, stdin=subprocess.DEVNULL)


class _NewFiles(_Writer):
    """dd to new files in assorted block sizes; now and then an append, or a delete."""

    made = 0

    def step(self) -> None:
        self.pace()
        block = self.rng.choice(list(_BLOCKS))
        count = max(1, self.rng.choice([64 << 10, 300 << 10, 1 << 20, 3 << 20, 8 << 20, 16 << 20]) // _BLOCKS[block])
        files = sorted(self.dir.iterdir())
        if files and self.rng.random() < 0.2:
            self.dd("if=/dev/urandom", f"of={self.rng.choice(files)}", f"bs={block}", f"count={count}",
                    "oflag=append", "conv=notrunc")
        else:
            self.made += 1
            self.dd("if=/dev/urandom", f"of={self.dir / f'dd-{self.made:04d}-{block}'}", f"bs={block}",
                    f"count={count}")
        self.written += count * _BLOCKS[block]
        if files and self.rng.random() < 0.1:
            os.unlink(self.rng.choice(files))


class _Appends(_Writer):
    """Appends to a few files held open, with an fsync now and then."""

    fds: list[int] = []

    def step(self) -> None:
        if not self.fds:
            self.fds = [os.open(self.dir / f"log-{i}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                        for i in range(4)]
        self.pace()
        fd = self.rng.choice(self.fds)
        os.write(fd, self.data(self.rng.choice([100, 4096, 5000, 65536, 300_000])))
        if self.rng.random() < 0.05:
            os.fsync(fd)
        time.sleep(self.rng.random() * 0.01)

    def finish(self) -> None:
        for fd in self.fds:
            os.close(fd)


class _InPlace(_Writer):
    """Blocks overwritten at random offsets of a few files (dd conv=notrunc)."""

    files: list[tuple[Path, int]] = []

    def step(self) -> None:
        if not self.files:
            self.files = [(self.dir / f"img-{i}", self.rng.choice([4, 8, 16]) << 20) for i in range(3)]
            for path, size in self.files:
                self.dd("if=/dev/urandom", f"of={path}", "bs=1M", f"count={size >> 20}")
                self.written += size
        self.pace()
        path, size = self.rng.choice(self.files)
        block = self.rng.choice(list(_BLOCKS))
        count = self.rng.randint(1, max(1, min(16, size // _BLOCKS[block] // 4)))
        seek = self.rng.randint(0, max(0, size // _BLOCKS[block] - count))
        self.dd("if=/dev/urandom", f"of={path}", f"bs={block}", f"count={count}", f"seek={seek}", "conv=notrunc")
        self.written += count * _BLOCKS[block]
        time.sleep(self.rng.random() * 0.02)


class _TruncateAppend(_Writer):
    """A file cut to a random smaller size, then appended to."""

    def step(self) -> None:
        self.pace()
        fd = os.open(self.dir / f"ta-{self.rng.randint(0, 4)}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            os.ftruncate(fd, self.rng.randint(0, size))
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, self.data(self.rng.choice([1, 777, 8192, 100_000, 1 << 20, 3 << 20])))
        finally:
            os.close(fd)
        time.sleep(self.rng.random() * 0.02)


class _Sparse(_Writer):
    """Sparse files: written far past their start, grown by truncate, written into their holes."""

    made = 0

    def step(self) -> None:
        self.pace()
        files = sorted(self.dir.iterdir())
        r = self.rng.random()
        if r < 0.3 or not files:
            self.made += 1
            self.dd("if=/dev/urandom", f"of={self.dir / f'sparse-{self.made:03d}'}", "bs=1M", "count=1",
                    f"seek={self.rng.randint(1, 48)}")
            self.written += 1 << 20
        elif r < 0.5:
            path = self.rng.choice(files)
            os.truncate(path, path.stat().st_size + self.rng.randint(1, 16 << 20))
        else:
            path = self.rng.choice(files)
            with open(path, "r+b") as f:
                f.seek(self.rng.randint(0, max(0, path.stat().st_size - 1)))
                f.write(self.data(self.rng.choice([1, 4096, 13 * 1024, 65536])))
        time.sleep(0.02 + self.rng.random() * 0.05)


class _SameSize(_Writer):
    """Files rewritten with new bytes of exactly their size, in place or truncated first."""

    files: list[tuple[Path, int]] = []

    def step(self) -> None:
        if not self.files:
            self.files = [(self.dir / f"same-{i}", self.rng.choice([5000, 65536, 1 << 20, 4 << 20])
                           + self.rng.randint(0, 4095)) for i in range(4)]
            for path, size in self.files:
                path.write_bytes(self.data(size))
        self.pace()
        path, size = self.rng.choice(self.files)
        if self.rng.random() < 0.5:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, self.data(size), 0)
            finally:
                os.close(fd)
        else:
            path.write_bytes(self.data(size))
        time.sleep(self.rng.random() * 0.05)


class _RenamedOpen(_Writer):
    """A file renamed (in its directory, or to another) while still open and written."""

    made = 0

    def step(self) -> None:
        self.pace()
        self.made += 1
        for sub in "ab":
            (self.dir / sub).mkdir(exist_ok=True)
        current = self.dir / "a" / f"mv-{self.made:04d}.tmp"
        fd = os.open(current, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for turn in range(self.rng.randint(2, 5)):
                for _ in range(self.rng.randint(1, 6)):
                    os.write(fd, self.data(self.rng.choice([4096, 65536, 250_000])))
                    time.sleep(self.rng.random() * 0.02)
                renamed = self.dir / self.rng.choice("ab") / f"mv-{self.made:04d}.r{turn}"
                os.rename(current, renamed)
                current = renamed
            os.write(fd, self.data(self.rng.randint(1, 100_000)))
        finally:
            os.close(fd)
        if self.rng.random() < 0.3:
            os.unlink(current)


class _RenamedDirs(_Writer):
    """A directory renamed (beside itself, or into a nest) while files in it are written; its
    old name is sometimes made again at once, and the moved one removed or moved back."""

    made = 0

    def step(self) -> None:
        self.pace()
        self.made += 1
        first = self.dir / f"d{self.made:03d}"
        (first / "sub").mkdir(parents=True)
        fds = [os.open(first / name, os.O_WRONLY | os.O_CREAT, 0o644) for name in ("x", "y", "sub/z")]
        current = first
        try:
            for turn in range(self.rng.randint(2, 4)):
                for _ in range(self.rng.randint(2, 8)):
                    os.write(self.rng.choice(fds), self.data(self.rng.choice([4096, 13 * 1024, 65536, 300_000])))
                    time.sleep(self.rng.random() * 0.01)
                if self.rng.random() < 0.5:
                    renamed = self.dir / f"d{self.made:03d}-moved{turn}"
                else:
                    nest = self.dir / "nest" / f"p{self.rng.randint(0, 2)}"
                    nest.mkdir(parents=True, exist_ok=True)
                    renamed = nest / f"d{self.made:03d}-r{turn}"
                os.rename(current, renamed)
                old, current = current, renamed
                if self.rng.random() < 0.35:
                    old.mkdir(parents=True, exist_ok=True)
                    (old / "x").write_bytes(self.data(self.rng.choice([10, 5000, 70_000])))
            for fd in fds:
                os.write(fd, self.data(self.rng.randint(1, 50_000)))
        finally:
            for fd in fds:
                os.close(fd)
        r = self.rng.random()
        if r < 0.2:
            shutil.rmtree(current)
        elif r < 0.35 and not first.exists():
            os.rename(current, first)


class _SmallFiles(_Writer):
    """Small files created, deleted and renamed; subdirectories, symlinks, chmod."""

    def step(self) -> None:
        if self.written >= self.budget:
            time.sleep(0.05)
        dirs = [self.dir / f"s{i}" for i in range(6)]
        for d in dirs:
            d.mkdir(exist_ok=True)
        d = self.rng.choice(dirs)
        entries = list(d.iterdir())
        r = self.rng.random()
        if r < 0.40 or not entries:
            path = d / f"f{self.rng.randint(0, 999):03d}"
            if not path.is_symlink():
                path.write_bytes(self.data(self.rng.choice([0, 1, 100, 4096, 4097, 9000, 65536, 70_000])))
        elif r < 0.55:
            e = self.rng.choice(entries)
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e, ignore_errors=True)
            else:
                e.unlink()
        elif r < 0.75:
            os.rename(self.rng.choice(entries), self.rng.choice(dirs) / f"r{self.rng.randint(0, 999):03d}")
        elif r < 0.82:
            sub = d / f"sd{self.rng.randint(0, 9)}"
            sub.mkdir(exist_ok=True)
            for i in range(self.rng.randint(1, 5)):
                (sub / f"g{i}").write_bytes(self.data(self.rng.randint(0, 3000)))
        elif r < 0.90:
            link = d / f"l{self.rng.randint(0, 99):02d}"
            if not link.is_symlink() and not link.exists():
                os.symlink(self.rng.choice(["../s0/f001", "nowhere", "f010", "/etc/hostname"]), link)
        else:
            e = self.rng.choice(entries)
            if not e.is_symlink():
                os.chmod(e, self.rng.choice([0o600, 0o640, 0o644, 0o755, 0o700] if e.is_file() else [0o700, 0o755, 0o750]))
        if self.rng.random() < 0.3:
            time.sleep(0.001)


#: Each writer's share of the byte budget.
_SHARES: list[tuple[type[_Writer], float]] = [
    (_NewFiles, 0.30), (_Appends, 0.10), (_InPlace, 0.10), (_TruncateAppend, 0.10), (_Sparse, 0.03),
    (_SameSize, 0.10), (_RenamedOpen, 0.10), (_RenamedDirs, 0.10), (_SmallFiles, 0.02),
]
