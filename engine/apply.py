"""The passive's side of a record: apply it to the replica, never exposing a torn file.

A new version of a file is built in a staged copy at the top of its tree
(`<tree>/.nf-stage/<gid>`, same file system as the target) from its "data" records and renamed
over the target by its "file" record, so readers see the old version or the new one, never a
mix; a small new file comes whole in its "file" record and is staged the same way. Every other record changes one thing atomically (rename, symlink swap, chmod, utime,
truncate) or is a no-op when its effect is already there, so any record may be applied twice:
after a crash the receiver replays from the first record of the unit that was not committed.
That holds while every path names what it named at the last commit; the receiver commits
before a record that would change that (`needs_commit_before`).

Every path is checked (`engine.paths.check_rel_path`) and resolved from the root prefix one
component at a time without following symlinks, so a record can reach neither outside the
protected set nor through a symlink in the replica. Symlink targets are stored verbatim and
never followed.

A clone's node-local identity files (machine-id, host keys, a patch agent's id) never
replicate, and what the active does to a directory above them does not take them either:
deleting the directory keeps them and the directories leading to them, renaming it moves every
other entry on its own and leaves them where they were, a directory renamed onto one that kept
them joins them, and replacing it with a file or symlink is refused.

Nothing here fsyncs: the receiver flushes the whole file system (syncfs) once per batch, before
it commits the applied position, which makes a batch durable at the cost of one flush instead of
two per file; a crash before that commit replays the batch.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.blocks import DIGEST_SIZE, data_extents, hash_bytes
from engine.direct import pwrite_all
from engine.errors import PathError, ProtocolError
from engine.held import Held, StagedDigests
from engine.manifest import MAX_ID, Entry
from engine.paths import (STAGE_NAME, check_rel_path, local_files_below, local_matcher, makedirs_parent, open_dir,
                          open_parent, tree_of)
from engine.writer import BackgroundWrites

if TYPE_CHECKING:
    from engine.config import ProtectedTree

__all__ = ["Applier", "OPS"]

OPS = ("data", "file", "files", "mkdir", "symlink", "delete", "rename", "attr")

#: ioctl number of FICLONE (linux/fs.h); the fcntl module names it only from Python 3.12.
FICLONE = getattr(fcntl, "FICLONE", 0x40049409)

#: Largest offset or size a record may name (keeps pwrite/ftruncate inside off_t).
MAX_OFFSET = 1 << 62

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_BYTES = 8 << 20


@dataclass
class _Stage:
    """A staged file being built: its target, and open fds of the file and of the stage dir."""

    path: str
    trusted: str
    dir_fd: int  # the tree's stage dir, owned by the Applier's cache
    name: str
    fd: int
    fresh: bool
    end: int = 0  # one past the last byte written: a fresh stage this long needs no truncate
    digests: StagedDigests | None = None  # of the blocks written, when hashes are kept
    base: Entry | None = None  # the target's kept hashes, when the stage started as its copy


class Applier:
    """Applies records to the replica under `root`; used from one thread at a time."""

    def __init__(self, root: Path, trees: Iterable["ProtectedTree"], *, stage_name: str = STAGE_NAME,
                 held: Held | None = None, block_size: int = 0, local_files: Iterable[str] = ()) -> None:
        """With `held` (and the cluster's `block_size`), the block hashes of every file version
        committed are kept there (see `engine.held`). Records naming one of `local_files` (this
        node's identity files, absolute globs) are refused."""
        self.root = Path(root)
        self.trees = tuple(trees)
        self.stage_name = stage_name
        # One regex for all node-local patterns: it is matched against every record's path.
        local_files = tuple(local_files)
        self._local = local_matcher(local_files)
        # What each pattern starts with before its first wildcard: only a directory on the way
        # to one of these, or below one, can hold an identity file, and only such a directory
        # is walked before it is removed or renamed.
        self._local_prefixes = tuple(re.split(r"[*?\[]", f.lstrip("/"), maxsplit=1)[0] for f in local_files)
        self.held = held if block_size > 0 else None
        self.block_size = block_size
        self._stages: dict[int, _Stage] = {}
        self._stage_fds: dict[str, int] = {}  # tree rel -> its stage dir
        self._parents: dict[str, int] = {}    # dir rel -> fd, for one batch (see end_batch)
        self._tmp = itertools.count(1)
        # Since the last commit (see needs_commit_before): paths that records changed, those
        # deleted or renamed away, and the files made whole from records alone.
        self._changed, self._gone, self._made_whole = _Near(), _Near(), set[str]()
        self._refused = False  # a record was refused since the last commit
        self._writes = BackgroundWrites()  # large chunks are written while the next records apply
        self._ops: dict[str, Callable[[dict[str, Any], bytes], bool]] = {
            "data": self._data, "file": self._file, "files": self._files, "mkdir": self._mkdir, "symlink": self._symlink,
            "delete": self._delete, "rename": self._rename, "attr": self._attr,
        }

    def apply(self, op: str, meta: dict[str, Any], data: bytes = b"", *, replayable: bool = True) -> bool:
        """Apply one record; True when it completes a unit (every op but "data"). A record that
        is never replayed (an initial sync's, applied straight from the channel) leaves nothing
        for `needs_commit_before` to remember with `replayable=False`.

        Raises ProtocolError for a malformed record, PathError for a refused path (nothing is
        changed in either case), OSError when the replica could not be changed (retry later,
        after `discard_stages`, from the first record of the unit).
        """
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            raise ProtocolError(f"unknown op {op!r}: expected one of {', '.join(OPS)}")
        if not isinstance(meta, dict):
            raise ProtocolError(f"{op}: expected an object for meta, got {type(meta).__name__}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"{op}: expected bytes for data, got {type(data).__name__}")
        try:
            done = handler(meta, data)
        except (PathError, ProtocolError):
            if replayable:
                self._refused = True
            raise
        if replayable and op != "data":  # a data record changes only its stage
            self._note(op, meta, data)
        return done

    def needs_commit_before(self, op: str, meta: dict[str, Any]) -> bool:
        """Whether what was applied since `committed` must be committed before this record.

        Replay after a crash repeats every record after the last commit, against a tree that
        already holds their effect. That is harmless until a path changes what it names:
        "rename log to log.1, write log" replayed would move the new log over log.1, and
        "write f, rename g to f" would write over what came from g. So these start a new unit
        of replay: a record that brings something to, above or below a path deleted or renamed
        away since the last commit, and a rename whose source or destination records changed
        since, unless its source is a file those records made whole (a temp file renamed into
        place: replay makes it again). And any record after a refused one: replayed once the tree
        has changed, the refused record might apply (a rename refused onto a directory that kept
        identity files goes through once its source is a directory too).
        """
        if self._refused:
            return True
        if not self._changed or not isinstance(meta, dict):
            return False
        if op == "rename":
            src, dst = meta.get("path"), meta.get("dst")
            if not isinstance(src, str) or not isinstance(dst, str):
                return False
            return self._gone.near(dst) or (src not in self._made_whole
                                             and (self._changed.near(src) or self._changed.near(dst)))
        if op in ("mkdir", "symlink", "file"):
            new = [meta.get("path")]
        elif op == "files" and isinstance(meta.get("files"), list):
            new = [e[0] for e in meta["files"] if isinstance(e, list) and e]
        else:
            return False
        return any(isinstance(path, str) and self._gone.near(path) for path in new)

    def committed(self) -> None:
        """The receiver's applied position now covers every record applied: none replays."""
        self._changed.clear()
        self._gone.clear()
        self._made_whole.clear()
        self._refused = False

    def end_batch(self) -> None:
        """Forget the directories opened for this batch.

        Parent directories stay open across the records of one batch, so a run of files in one
        directory costs no path walk each; they are dropped at every batch end (and whenever a
        record could move or replace a directory), so a cached fd never outlives what it named
        by long.
        """
        for fd in self._parents.values():
            os.close(fd)
        self._parents.clear()

    def discard_stages(self) -> None:
        """Close and remove every half-built staged file (start-up, or before a retry)."""
        for gid in list(self._stages):
            self._drop(gid)
        self.end_batch()
        self._close_stage_dirs()
        for tree in self.trees:
            try:
                tfd = open_dir(self.root, tree.rel)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                try:
                    sfd = os.open(self.stage_name, _DIR, dir_fd=tfd)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    os.unlink(self.stage_name, dir_fd=tfd)  # a symlink where the stage belongs
                    continue
                try:
                    for name in os.listdir(sfd):
                        _remove_at(sfd, name)
                finally:
                    os.close(sfd)
            finally:
                os.close(tfd)

    # -- ops -------------------------------------------------------------------------------
    def _data(self, meta: dict[str, Any], data: bytes) -> bool:
        path = self._path("data", meta)
        gid = _int("data", meta, "gid")
        offset = _int("data", meta, "offset", 0, MAX_OFFSET - len(data))
        fresh = _bool("data", meta, "fresh")
        digests = self._digests(meta, len(data))
        stage = self._stages.get(gid)
        if stage is not None and stage.path != path:
            self._drop(gid)  # a group that never finished (its sender restarted); start again
            stage = None
        if stage is None:
            stage = self._stages[gid] = self._new_stage(path, str(gid), fresh=fresh)
        self._writes.write(stage.fd, data, offset)  # large chunks around the page cache (engine.direct)
        stage.end = max(stage.end, offset + len(data))
        if stage.digests is not None:
            stage.digests.add(offset, data, digests)
        return False

    def _digests(self, meta: dict[str, Any], length: int) -> bytes | None:
        """The block digests a sync record brought along for its data (see `engine.held`), if any."""
        value = meta.get("digests")
        if value is None or not self.block_size:
            return None
        want = -(-length // self.block_size) * DIGEST_SIZE
        try:
            digests = bytes.fromhex(value) if isinstance(value, str) else None
        except ValueError:
            digests = None
        if digests is None or len(digests) != want:
            raise ProtocolError(f"data.digests: expected {want * 2} hex digits (one digest per "
                                f"{self.block_size}-byte block of the data)")
        return digests

    def _file(self, meta: dict[str, Any], data: bytes) -> bool:
        path = self._path("file", meta)
        gid = _opt_int("file", meta, "gid")
        size = _int("file", meta, "size", 0, MAX_OFFSET)
        mode = _mode("file", meta)
        mtime_ns = _int("file", meta, "mtime_ns")
        fresh = _bool("file", meta, "fresh")
        owner = _owner("file.owner", meta.get("owner"))
        if data:  # a small new file travels whole in its "file" record
            if len(data) != size or gid is not None:
                raise ProtocolError(f"file: {len(data)} bytes of content for a file of {size} bytes "
                                    "(expected the whole content, and no gid)")
            self._whole(path, data, mode, mtime_ns, fresh=fresh, owner=owner)
            return True
        stage = self._stages.pop(gid, None) if gid is not None else None
        if stage is not None and stage.path != path:
            self._close_stage(stage, unlink=True)
            stage = None
        if stage is None:
            if not fresh and self._update_in_place(path, size, mode, mtime_ns, owner=owner):
                return True
            stage = self._new_stage(path, f"t{next(self._tmp)}", fresh=True)
        self._commit(stage, size, mode, mtime_ns, owner=owner)
        return True

    def _files(self, meta: dict[str, Any], data: bytes) -> bool:
        """Small new files, each whole, their contents back to back in `data` (an initial sync
        ships them so). Every entry is checked before any file is written."""
        files = meta.get("files")
        if not isinstance(files, list) or not files:
            raise ProtocolError("files.files: expected a non-empty list of [path, size, mode, mtime_ns]")
        checked = []
        end = 0
        for i, f in enumerate(files):
            op = f"files.files[{i}]"
            if not isinstance(f, list) or len(f) != 4:
                raise ProtocolError(f"{op}: expected [path, size, mode, mtime_ns]")
            fields = dict(zip(("path", "size", "mode", "mtime_ns"), f))
            path = self._path(op, fields)
            size = _int(op, fields, "size", 0, len(data) - end)
            checked.append((path, end, size, _mode(op, fields), _int(op, fields, "mtime_ns")))
            end += size
        if end != len(data):
            raise ProtocolError(f"files: {len(data)} bytes of content for files of {end} bytes in all")
        owners = meta.get("owners")  # a list of its own: an older active sends none
        if owners is not None and (not isinstance(owners, list) or len(owners) != len(files)):
            raise ProtocolError(f"files.owners: expected a list of {len(files)} [uid, gid]")
        owned = [_owner(f"files.owners[{i}]", o) for i, o in enumerate(owners)] if owners else [None] * len(files)
        view = memoryview(data)
        for (path, start, size, mode, mtime_ns), owner in zip(checked, owned):
            self._whole(path, view[start : start + size], mode, mtime_ns, fresh=True, owner=owner)
        return True

    def _whole(self, path: str, data: bytes | memoryview, mode: int, mtime_ns: int, *, fresh: bool,
               owner: Owner) -> None:
        """A file that arrived whole: written under its name when new, else staged and renamed."""
        if not (fresh and self._create_new(path, data, mode, mtime_ns, owner)):
            self._replace_whole(path, data, mode, mtime_ns, owner)
        if self.held is not None:
            self.held.put(Entry(path, "file", mode, len(data), mtime_ns, None, hash_bytes(data, self.block_size)))

    def _mkdir(self, meta: dict[str, Any], data: bytes) -> bool:
        path = self._path("mkdir", meta, allow_tree_root=True)
        mode = _mode("mkdir", meta)
        mtime_ns = _int("mkdir", meta, "mtime_ns")
        owner = _owner("mkdir.owner", meta.get("owner"))
        tree = self._tree(path)
        self.end_batch()  # a non-directory in its place is replaced
        if path == tree.rel:
            fd = open_dir(self.root, path, create=True)
        else:
            parent, name = makedirs_parent(self.root, path, trusted=tree.rel)
            try:
                fd = _open_or_make_dir(parent, name, mode)
            finally:
                os.close(parent)
        try:
            _fchown(fd, owner)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        if self.held is not None and (kept := self.held.get(path)) is not None and kept.kind == "file":
            self.held.forget(path)  # a directory replaced the file
        return True

    def _symlink(self, meta: dict[str, Any], data: bytes) -> bool:
        path = self._path("symlink", meta)
        target = meta.get("target")
        if not isinstance(target, str) or not target or "\x00" in target or len(os.fsencode(target)) >= 4096:
            raise ProtocolError("symlink.target: expected a non-empty string without NUL, under 4096 bytes")
        mtime_ns = _int("symlink", meta, "mtime_ns")
        owner = _owner("symlink.owner", meta.get("owner"))
        tree = self._tree(path)
        self.end_batch()  # a directory in its place is removed
        parent, name = makedirs_parent(self.root, path, trusted=tree.rel)
        try:
            sfd = self._stage_dir(tree)
            tmp = f"s{next(self._tmp)}"
            _remove_at(sfd, tmp)
            os.symlink(target, tmp, dir_fd=sfd)
            if owner is not None:
                _ignore_eperm(os.chown, tmp, *owner, dir_fd=sfd, follow_symlinks=False)
            try:
                self._clear_dir(parent, name, path)
                _remove_dir_at(parent, name)  # rename cannot put a symlink over a directory
                os.rename(tmp, name, src_dir_fd=sfd, dst_dir_fd=parent)
            except BaseException:
                _remove_at(sfd, tmp)
                raise
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)
        if self.held is not None:
            self.held.forget(path)
        return True

    def _delete(self, meta: dict[str, Any], data: bytes) -> bool:
        path = self._path("delete", meta, allow_tree_root=True)
        tree = self._tree(path)
        self.end_batch()
        if path == tree.rel:
            for gid in [g for g, s in self._stages.items() if s.trusted == tree.rel]:
                self._drop(gid)  # the stage dir goes with the tree
            fd = self._stage_fds.pop(tree.rel, None)
            if fd is not None:
                os.close(fd)
        if self.held is not None:
            self.held.forget(path)
        try:
            parent, name = open_parent(self.root, path, trusted=tree.rel)
        except FileNotFoundError:
            return True
        try:
            if self._may_hold_local(path) and _is_dir_at(parent, name):
                self._prune(parent, name, path)
            else:
                _remove_at(parent, name)
        finally:
            os.close(parent)
        return True

    def _rename(self, meta: dict[str, Any], data: bytes) -> bool:
        src = self._path("rename", meta)
        dst = self._path("rename", meta, field="dst")
        if src == dst:
            return True
        if dst.startswith(src + "/"):
            raise PathError(dst, f"inside {src!r}, the path being renamed")
        if src.startswith(dst + "/"):
            raise PathError(dst, f"holds {src!r}, the path being renamed")
        self.end_batch()
        try:
            sp, sn = open_parent(self.root, src, trusted=self._tree(src).rel)
        except FileNotFoundError:
            return True  # applied before (replay), or never here: nothing to move
        try:
            try:
                st = os.stat(sn, dir_fd=sp, follow_symlinks=False)
            except FileNotFoundError:
                return True
            dp, dn = makedirs_parent(self.root, dst, trusted=self._tree(dst).rel)
            try:
                # This clone's identity files below either side, relative to it: walked once.
                kept = (_Kept(self._local_below(sp, sn, src)), _Kept(self._local_below(dp, dn, dst))) \
                    if stat.S_ISDIR(st.st_mode) else ()
                if any(kept):
                    self._check_merge(sp, sn, dst, *kept)
                    self._merge(sp, sn, dp, dn, dst, *kept)
                else:
                    self._replace(sp, sn, dp, dn, dst, stat.S_ISDIR(st.st_mode))
            finally:
                os.close(dp)
        finally:
            os.close(sp)
        if self.held is not None:
            self.held.move(src, dst)
        return True

    def _replace(self, sp: int, sn: str, dp: int, dn: str, dst: str, src_is_dir: bool) -> None:
        """rename(2), which replaces only a non-directory or an empty one: a directory in the
        way goes first (unless it holds an identity file), as a directory renamed over a file."""
        if _is_dir_at(dp, dn) or (src_is_dir and _lexists_at(dp, dn)):
            self._clear_dir(dp, dn, dst)
            _remove_at(dp, dn)
        os.rename(sn, dn, src_dir_fd=sp, dst_dir_fd=dp)

    def _merge(self, sp: int, sn: str, dp: int, dn: str, dst: str, src_kept: "_Kept", dst_kept: "_Kept",
               rel: str = "") -> None:
        """Rename directory `sn` to `dn` around this clone's identity files on either side.

        Below the source they and the directories leading to them stay where they are; below
        `dst` (a directory the active renamed away before, which kept them) they stay too, and
        an incoming entry of the same name goes. Every other entry is renamed on its own, so a
        crash part-way leaves a move that replay finishes; nothing already below `dst` is
        removed, as a replay finds there what the first pass moved. `_check_merge` has passed.
        """
        sfd = os.open(sn, _DIR, dir_fd=sp)
        try:
            st = os.fstat(sfd)
            if not _is_dir_at(dp, dn):
                _remove_at(dp, dn)
                os.mkdir(dn, 0o700, dir_fd=dp)
            dfd = os.open(dn, _DIR, dir_fd=dp)
            try:
                for name in os.listdir(sfd):
                    child = rel + name
                    if child in src_kept:
                        continue  # this clone's, and stays
                    if child in dst_kept:
                        _remove_at(sfd, name)  # this clone's own is there, and stays
                    elif src_kept.leads(child) or dst_kept.leads(child):
                        self._merge(sfd, name, dfd, name, f"{dst}/{name}", src_kept, dst_kept, child + "/")
                    else:
                        self._replace(sfd, name, dfd, name, f"{dst}/{name}", _is_dir_at(sfd, name))
                os.fchmod(dfd, stat.S_IMODE(st.st_mode))
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
            empty = not os.listdir(sfd)
        finally:
            os.close(sfd)
        if empty:
            os.rmdir(sn, dir_fd=sp)  # nothing of this clone's held it back

    def _check_merge(self, sp: int, sn: str, dst: str, src_kept: "_Kept", dst_kept: "_Kept", rel: str = "") -> None:
        """Refuse, before anything changes, a merge that would put an identity file of this
        clone (or a directory leading to one) where the other side needs something else."""
        sfd = os.open(sn, _DIR, dir_fd=sp)
        try:
            for name in os.listdir(sfd):
                child = rel + name
                if child in src_kept:
                    continue
                if child in dst_kept:
                    if src_kept.leads(child):
                        raise PathError(f"{dst}/{name}", "is a node-local identity file of this clone, and the "
                                                         "directory renamed onto it holds some there too")
                elif src_kept.leads(child) or dst_kept.leads(child):
                    if not _is_dir_at(sfd, name):
                        below = next(k for k in dst_kept if k.startswith(child + "/"))
                        raise PathError(f"{dst}/{name}", f"holds {dst}/{below[len(rel):]}, a node-local identity "
                                                         "file of this clone, which stays; the directory cannot be replaced")
                    self._check_merge(sfd, name, f"{dst}/{name}", src_kept, dst_kept, child + "/")
        finally:
            os.close(sfd)

    def _attr(self, meta: dict[str, Any], data: bytes) -> bool:
        path = self._path("attr", meta, allow_tree_root=True)
        mode = _mode("attr", meta)
        mtime_ns = _int("attr", meta, "mtime_ns")
        owner = _owner("attr.owner", meta.get("owner"))
        tree = self._tree(path)
        if path == tree.rel:
            try:
                fd = open_dir(self.root, path)
            except (FileNotFoundError, NotADirectoryError):
                return True
            try:
                _fchown(fd, owner)
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
            return True
        try:
            parent, name = open_parent(self.root, path, trusted=tree.rel)
        except FileNotFoundError:
            return True
        try:
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return True
            if owner is not None:
                _ignore_eperm(os.chown, name, *owner, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                # fchmodat cannot refuse a symlink on Linux; the lstat above says this is none,
                # and nothing but apply writes to a passive's tree.
                os.chmod(name, mode, dir_fd=parent)
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)
        if self.held is not None and stat.S_ISREG(st.st_mode):
            self.held.retime(path, mode, mtime_ns)
        return True

    def _replace_whole(self, path: str, data: bytes | memoryview, mode: int, mtime_ns: int, owner: Owner) -> None:
        """Stage the whole new content and rename it over whatever is at `path`."""
        stage = self._new_stage(path, f"t{next(self._tmp)}", fresh=True)
        try:
            pwrite_all(stage.fd, data, 0)
        except BaseException:
            self._close_stage(stage, unlink=True)
            raise
        stage.end = len(data)
        stage.digests = None  # the whole content is at hand: the caller hashes it
        self._commit(stage, len(data), mode, mtime_ns, owner=owner)

    def _create_new(self, path: str, data: bytes | memoryview, mode: int, mtime_ns: int, owner: Owner) -> bool:
        """Write a small new file straight under its name; False when the name is taken.

        Staging and renaming across directories doubled the directory work of an initial sync
        of many small files. A file that did not exist has no old version to tear; if the
        agent dies half-way, the record is replayed, finds the name taken and goes through a
        stage like any replacement.
        """
        parent, name = self._parent(path, self._tree(path).rel)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
        except FileExistsError:
            return False
        try:
            pwrite_all(fd, data, 0)
            _fchown(fd, owner)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        except BaseException:
            try:
                os.unlink(name, dir_fd=parent)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)
        return True

    # -- staging ---------------------------------------------------------------------------
    def _new_stage(self, path: str, name: str, *, fresh: bool) -> _Stage:
        """A stage file for `path`: empty when `fresh`, else a copy of the current target."""
        tree = self._tree(path)
        sfd = self._stage_dir(tree)
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=sfd)
        stage = _Stage(path, tree.rel, sfd, name, fd, fresh)
        if self.held is not None:
            stage.digests = StagedDigests(self.block_size)
        try:
            if not fresh:
                copied = self._copy_target(stage)
                if copied is None:
                    stage.fresh = True  # nothing to copy: the stage is as empty as a fresh one
                elif self.held is not None:
                    kept = self.held.get(path)
                    if kept is not None and kept.kind == "file" and (kept.size, kept.mtime_ns) == copied:
                        stage.base = kept
        except BaseException:
            self._close_stage(stage, unlink=True)
            raise
        return stage

    def _copy_target(self, stage: _Stage) -> tuple[int, int] | None:
        """Copy the target into the stage if it is a regular file: clone, else data extents.
        Returns the (size, mtime_ns) copied, or None when there was no regular file to copy."""
        try:
            parent, name = open_parent(self.root, stage.path, trusted=stage.trusted)
        except FileNotFoundError:
            return None
        try:
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EISDIR):
                return None  # missing, a symlink or a socket: the new version starts empty
            raise
        finally:
            os.close(parent)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                return None
            _clone(src, stage.fd, st.st_size)
            return st.st_size, st.st_mtime_ns
        finally:
            os.close(src)

    def _commit(self, stage: _Stage, size: int, mode: int, mtime_ns: int, *, owner: Owner) -> None:
        """Finish the staged file and rename it over its target."""
        try:
            self._writes.wait(stage.fd)
            fd = stage.fd
            if not (stage.fresh and stage.end == size):
                os.ftruncate(fd, size)
            _fchown(fd, owner)  # before the mode: chown clears set-user-id and set-group-id
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
            parent, name = self._parent(stage.path, stage.trusted)
            try:
                os.rename(stage.name, name, src_dir_fd=stage.dir_fd, dst_dir_fd=parent)
            except OSError as exc:
                if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise
                self.end_batch()  # a directory is in the way: what was below it goes
                parent, name = self._parent(stage.path, stage.trusted)
                self._clear_dir(parent, name, stage.path)
                _remove_dir_at(parent, name)
                os.rename(stage.name, name, src_dir_fd=stage.dir_fd, dst_dir_fd=parent)
                if self.held is not None:
                    self.held.forget(stage.path)
        except BaseException:
            self._close_stage(stage, unlink=True)
            raise
        try:
            self._keep_hashes(stage, size, mode, mtime_ns)
        finally:
            self._close_stage(stage, unlink=False)

    def _keep_hashes(self, stage: _Stage, size: int, mode: int, mtime_ns: int) -> None:
        if self.held is None or stage.digests is None:
            return
        bs = self.block_size
        hashes = stage.digests.final(size, fresh=stage.fresh, base=stage.base,
                                     read_block=lambda i: os.pread(stage.fd, bs, i * bs))
        self.held.put(Entry(stage.path, "file", mode, size, mtime_ns, None, hashes))

    def _update_in_place(self, path: str, size: int, mode: int, mtime_ns: int, *, owner: Owner) -> bool:
        """Set size, mode, owner and mtime of an existing regular file; False if there is none."""
        tree = self._tree(path)
        try:
            parent, name = open_parent(self.root, path, trusted=tree.rel)
        except FileNotFoundError:
            return False
        try:
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if not stat.S_ISREG(st.st_mode):
                return False
            flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            flags |= os.O_WRONLY if st.st_size != size else os.O_RDONLY
            fd = os.open(name, flags, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            if st.st_size != size:
                os.ftruncate(fd, size)
            _fchown(fd, owner)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        if self.held is not None:
            if st.st_size == size:
                self.held.retime(path, mode, mtime_ns)
            else:
                self.held.forget(path)  # truncated in place: its last block is unknown
        return True

    def _parent(self, path: str, trusted: str) -> tuple[int, str]:
        """`makedirs_parent`, with the fd kept until the batch ends (the caller does not close it)."""
        head, _, name = path.rpartition("/")
        fd = self._parents.get(head)
        if fd is None:
            if len(self._parents) >= 256:
                self.end_batch()
            fd, name = makedirs_parent(self.root, path, trusted=trusted)
            self._parents[head] = fd
        return fd, name

    def _stage_dir(self, tree: "ProtectedTree") -> int:
        """An fd of the tree's stage dir, created (mode 0700, with the tree) when missing.

        Kept open (the caller does not close it) until the tree is deleted or stages are
        discarded: the stage dir is the passive's own, and nothing else renames it.
        """
        fd = self._stage_fds.get(tree.rel)
        if fd is None:
            fd = self._stage_fds[tree.rel] = self._open_stage_dir(tree)
        return fd

    def _close_stage_dirs(self) -> None:
        for fd in self._stage_fds.values():
            os.close(fd)
        self._stage_fds.clear()

    def _open_stage_dir(self, tree: "ProtectedTree") -> int:
        tfd = open_dir(self.root, tree.rel, create=True)
        try:
            for _ in range(3):
                try:
                    sfd = os.open(self.stage_name, _DIR, dir_fd=tfd)
                except FileNotFoundError:
                    try:
                        os.mkdir(self.stage_name, 0o700, dir_fd=tfd)
                    except FileExistsError:
                        pass
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    os.unlink(self.stage_name, dir_fd=tfd)  # not ours: a symlink or a file
                    continue
                if stat.S_IMODE(os.fstat(sfd).st_mode) != 0o700:
                    os.fchmod(sfd, 0o700)
                return sfd
        finally:
            os.close(tfd)
        raise FileNotFoundError(errno.ENOENT, "stage directory kept vanishing", f"{tree.rel}/{self.stage_name}")

    def _close_stage(self, stage: _Stage, *, unlink: bool) -> None:
        """Close a stage's file once no write uses it any more; remove it with `unlink`."""
        try:
            self._writes.wait(stage.fd)
        except OSError:
            pass  # a write that failed: the stage goes, and its unit is retried or repaired
        try:
            os.close(stage.fd)
        except OSError:
            pass
        if unlink:
            try:
                os.unlink(stage.name, dir_fd=stage.dir_fd)
            except OSError:
                pass

    def _drop(self, gid: int) -> None:
        stage = self._stages.pop(gid, None)
        if stage is not None:
            self._close_stage(stage, unlink=True)

    # -- replay ----------------------------------------------------------------------------
    def _note(self, op: str, meta: dict[str, Any], data: bytes) -> None:
        """Remember what an applied record changed, for `needs_commit_before`."""
        if op == "files":
            changed = [(f[0], True) for f in meta["files"]]
        elif op == "file":  # whole when built from records alone: content in it, or a fresh stage
            changed = [(meta["path"], bool(data) or meta["fresh"] is True)]
        elif op == "rename":
            changed = [(meta["path"], False), (meta["dst"], False)]
            self._gone.add(meta["path"])
        else:
            changed = [(meta["path"], op == "symlink")]
            if op == "delete":
                self._gone.add(meta["path"])
        for path, whole in changed:
            self._changed.add(path)
            if whole:
                self._made_whole.add(path)
            else:
                self._made_whole.discard(path)

    # -- this clone's identity files ---------------------------------------------------------
    def _prune(self, parent: int, name: str, path: str) -> bool:
        """Remove directory `path` (`name` in `parent`) but for the identity files below it and
        the directories leading to them; True when something was kept (the directory stays)."""
        fd = os.open(name, _DIR, dir_fd=parent)
        kept = False
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    child = f"{path}/{entry.name}"
                    if self._local.match(child):
                        kept = True
                    elif entry.is_dir(follow_symlinks=False):
                        kept = self._prune(fd, entry.name, child) or kept
                    else:
                        _remove_at(fd, entry.name)
        finally:
            os.close(fd)
        if not kept:
            os.rmdir(name, dir_fd=parent)
        return kept

    def _local_below(self, parent: int, name: str, path: str) -> list[str]:
        """The identity files of this clone below directory `path`, relative to it."""
        return local_files_below(parent, name, path, self._local) if self._may_hold_local(path) else []

    def _may_hold_local(self, path: str) -> bool:
        """Whether an identity file could be below directory `path`."""
        below = path + "/"
        return any(prefix.startswith(below) or below.startswith(prefix) for prefix in self._local_prefixes)

    def _clear_dir(self, parent: int, name: str, path: str) -> None:
        """Refuse, before anything changes, to replace a directory that holds an identity file."""
        own = self._local_below(parent, name, path)
        if own:
            raise PathError(path, f"holds {path}/{own[0]}, a node-local identity file of this clone, "
                                  "which stays; the directory cannot be replaced")

    # -- checks ----------------------------------------------------------------------------
    def _path(self, op: str, meta: dict[str, Any], *, field: str = "path", allow_tree_root: bool = False) -> str:
        if field not in meta:
            raise ProtocolError(f"{op}.{field}: expected a path, got nothing")
        path = check_rel_path(meta[field], self.trees, allow_tree_root=allow_tree_root, stage_name=self.stage_name)
        if self._local.match(path):
            raise PathError(path, "a node-local identity file of this clone (never replicated)")
        return path

    def _tree(self, path: str) -> "ProtectedTree":
        tree = tree_of(path, self.trees)
        if tree is None:  # check_rel_path has passed, so this cannot happen
            raise PathError(path, "outside the protected set")
        return tree


# -- private helpers -----------------------------------------------------------------------

def _int(op: str, meta: dict[str, Any], field: str, low: int | None = None, high: int | None = None) -> int:
    value = meta.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{op}.{field}: expected an integer, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ProtocolError(f"{op}.{field}: expected an integer in {low}..{high}, got {value}")
    return value


def _opt_int(op: str, meta: dict[str, Any], field: str) -> int | None:
    if meta.get(field) is None:
        return None
    return _int(op, meta, field)


def _mode(op: str, meta: dict[str, Any]) -> int:
    return _int(op, meta, "mode", 0, 0o7777)


Owner = tuple[int, int] | None  # (uid, gid); None where the active did not say (an older version)


def _owner(field: str, value: object) -> Owner:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID for v in value)):
        raise ProtocolError(f"{field}: expected [uid, gid], two integers in 0..{MAX_ID}")
    return value[0], value[1]


def _fchown(fd: int, owner: Owner) -> None:
    if owner is not None:
        _ignore_eperm(os.fchown, fd, *owner)


def _ignore_eperm(chown: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Give an entry its owner; a passive that does not run as root keeps its own."""
    try:
        chown(*args, **kwargs)
    except PermissionError:
        pass


def _bool(op: str, meta: dict[str, Any], field: str) -> bool:
    value = meta.get(field)
    if not isinstance(value, bool):
        raise ProtocolError(f"{op}.{field}: expected true or false, got {type(value).__name__}")
    return value


def _clone(src: int, dst: int, size: int) -> None:
    """Make `dst` a copy of `src`: a reflink where the file system can, else only the data
    extents (holes stay holes), then the exact size."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        pass
    use_cfr = hasattr(os, "copy_file_range")
    for start, end in data_extents(src, size):
        pos = start
        while pos < end:
            n = min(_COPY_BYTES, end - pos)
            if use_cfr:
                try:
                    done = os.copy_file_range(src, dst, n, pos, pos)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    use_cfr = False
                    continue
            else:
                chunk = os.pread(src, n, pos)
                pwrite_all(dst, chunk, pos)
                done = len(chunk)
            if done == 0:
                break  # the source shrank under us
            pos += done
    os.ftruncate(dst, size)


def _open_or_make_dir(parent: int, name: str, mode: int) -> int:
    """An fd of directory `name` in `parent`, made if missing, replacing a non-directory."""
    for _ in range(3):
        try:
            return os.open(name, _DIR, dir_fd=parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            os.unlink(name, dir_fd=parent)
        try:
            os.mkdir(name, mode & 0o777 | 0o700, dir_fd=parent)
        except FileExistsError:
            pass
    raise FileNotFoundError(errno.ENOENT, "directory kept changing while made", name)


def _remove_at(parent: int, name: str) -> None:
    """Remove `name` in `parent` whatever it is, a directory with all it holds; never follows
    a symlink; missing is fine."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent)
    else:
        try:
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass


class _Near:
    """A set of paths that answers whether a path is one of them, above one or below one."""

    def __init__(self) -> None:
        self._paths: set[str] = set()
        self._above: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._paths)

    def add(self, path: str) -> None:
        self._paths.add(path)
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            if path in self._above:
                break  # and so is every directory above it
            self._above.add(path)

    def near(self, path: str) -> bool:
        if not self._paths:
            return False
        if path in self._paths or path in self._above:
            return True
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            if path in self._paths:
                return True
        return False

    def clear(self) -> None:
        self._paths.clear()
        self._above.clear()


class _Kept(frozenset[str]):
    """This clone's identity files below a directory, as paths relative to it."""

    def leads(self, rel: str) -> bool:
        """Whether `rel` is a directory on the way to one of them."""
        return any(k.startswith(rel + "/") for k in self)


def _lexists_at(parent: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _is_dir_at(parent: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _remove_dir_at(parent: int, name: str) -> None:
    """Remove `name` in `parent` if it is a directory (rename cannot replace one by a file)."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent)
