"""How commands print: rich for people, stable JSON for scripts, one error shape for both.

Exit codes scripts can trust: 0 success, 1 error, 2 usage (typer), 3 no agent answered,
4 verify found differences.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console

from engine.errors import AgentUnreachable, NfError

EXIT_ERROR = 1
EXIT_UNREACHABLE = 3
EXIT_DIFFERENCES = 4

console = Console()
err_console = Console(stderr=True)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def fail(exc: NfError, *, as_json: bool) -> NoReturn:
    code = EXIT_UNREACHABLE if isinstance(exc, AgentUnreachable) or exc.code == "agent_unreachable" else EXIT_ERROR
    if as_json:
        print_json({"error": exc.to_json()})
    else:
        err_console.print(f"[bold red]Error:[/] {exc.message}", highlight=False)
        if exc.hint:
            err_console.print(f"[dim]Hint:[/] {exc.hint}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def errors(as_json: bool) -> Iterator[None]:
    """Turn nf's own errors into the documented output and exit code."""
    try:
        yield
    except NfError as exc:
        fail(exc, as_json=as_json)


def run(as_json: bool, fn: Callable[[], Any]) -> Any:
    with errors(as_json):
        return fn()
