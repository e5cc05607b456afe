"""Every hook nf calls on its plugins (pluggy project "nf"), in one place.

Plugins implement these with `@hookimpl` from here and are found through the `nf.integrations`
entry-point group (built-ins use the same table). The engine never calls `pm.hook.*` itself: it
goes through the typed facade in `engine.plugins`, which validates what plugins return and
bounds each call by a timeout.
"""
from __future__ import annotations

import pluggy

PROJECT = "nf"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def nf_identity_files(node_id: str) -> list[str]:
    """Files that make this clone a distinct machine to the plugin's tool.

    Fires once when an agent starts. Gets the node id. Returns absolute paths (a glob allowed in
    the last part), such as a patch agent's client id file; every plugin's lists are joined
    (not firstresult). Those files never replicate: the node neither ships nor compares them,
    and refuses records that name them, so each clone keeps its own through `verify --repair`.
    """
    raise NotImplementedError
