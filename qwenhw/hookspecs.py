"""The hooks a qwenhw plugin may implement.

Every hook receives a `register` callback, so a hook can grow keyword arguments later without breaking
plugins, and an implementation may accept fewer arguments than the spec names::

    import qwenhw

    @qwenhw.hookimpl
    def register_backends(register):
        register(MyBackend())

Plugins are found through the entry-point group ``qwenhw``; see docs/plugins.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from .backend import Backend
    from .hardware.profile import Accelerator, ProbeResult
    from .models.spec import ModelSpec

hookspec = pluggy.HookspecMarker("qwenhw")
hookimpl = pluggy.HookimplMarker("qwenhw")


# --- execution -----------------------------------------------------------------------------------
@hookspec
def register_backends(register: Callable[["Backend"], None]) -> None:
    """Register backends: call ``register(backend)`` once per `qwenhw.Backend` instance.

    :param register: adds one backend; a name already taken by another distribution is an error.
    """


# --- detection -----------------------------------------------------------------------------------
@hookspec
def register_hardware_probes(
    register: Callable[[str, Callable[[], tuple[list["Accelerator"], "ProbeResult"]]], None],
) -> None:
    """Register extra hardware probes (e.g. AMD GPUs through amdsmi).

    :param register: ``register(name, probe)``; ``probe()`` returns ``(accelerators, ProbeResult)`` and is
        called by `qwenhw.detect()`. A probe that raises is recorded with its error; detection goes on.
    """


# --- models --------------------------------------------------------------------------------------
@hookspec
def register_models(register: Callable[["ModelSpec"], None]) -> None:
    """Register extra model specs for the catalog (fine-tunes, new Qwen releases).

    :param register: ``register(spec)`` with a `qwenhw.ModelSpec`; its ``name`` becomes a catalog name.
    """
