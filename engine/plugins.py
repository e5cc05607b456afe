"""The engine's typed door to its plugins: load them, call them with a deadline, check what they say.

Load order: built-ins, then the `nf.integrations` entry points, then `check_pending()`, so a
misspelt hook implementation fails at start rather than never being called. A plugin that
answers late or with nonsense is an error that names the plugin and the value.
"""
from __future__ import annotations

import concurrent.futures
import posixpath
from collections.abc import Iterable
from typing import Any

import pluggy

from engine import hookspecs
from engine.errors import NfError

ENTRY_POINTS = "nf.integrations"
CALL_TIMEOUT = 5.0


class PluginError(NfError):
    pass


class Plugins:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    @classmethod
    def load(cls) -> Plugins:
        """Built-ins and installed integrations (the agent's start)."""
        pm = _manager()
        pm.load_setuptools_entrypoints(ENTRY_POINTS)
        return cls._checked(pm)

    @classmethod
    def of(cls, plugins: Iterable[Any]) -> Plugins:
        """Only these plugin objects (tests register throwaway plugins, never what is installed)."""
        pm = _manager()
        for p in plugins:
            pm.register(p)
        return cls._checked(pm)

    @classmethod
    def _checked(cls, pm: pluggy.PluginManager) -> Plugins:
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {pm.get_name(exc.plugin)}: {exc}",
                              hint="a hook implementation must be named like a hook in engine/hookspecs.py") from None
        return cls(pm)

    def identity_files(self, node_id: str) -> tuple[str, ...]:
        out: list[str] = []
        for impl in self.pm.hook.nf_identity_files.get_hookimpls():
            name = self.pm.get_name(impl.plugin)
            files = _call(name, "nf_identity_files", impl.function, node_id=node_id)
            if not isinstance(files, (list, tuple)) or not all(isinstance(f, str) for f in files):
                raise PluginError(f"plugin {name}: nf_identity_files returned {files!r}, expected a list of paths")
            for f in files:
                if not f.startswith("/") or f == "/" or posixpath.normpath(f) != f:
                    raise PluginError(f"plugin {name}: nf_identity_files returned {f!r}, expected an absolute, "
                                      "normalised file path")
            out.extend(files)
        return tuple(dict.fromkeys(out))


def _manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _call(plugin: str, hook: str, fn: Any, **kwargs: Any) -> Any:
    """One plugin call in a worker thread, given up on after CALL_TIMEOUT (a slow vendor never stalls us)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plugin-{plugin}")
    try:
        return pool.submit(fn, **kwargs).result(timeout=CALL_TIMEOUT)
    except concurrent.futures.TimeoutError:
        raise PluginError(f"plugin {plugin}: {hook} did not return within {CALL_TIMEOUT:g} s") from None
    except Exception as exc:
        raise PluginError(f"plugin {plugin}: {hook} failed: {type(exc).__name__}: {exc}") from None
    finally:
        pool.shutdown(wait=False)
