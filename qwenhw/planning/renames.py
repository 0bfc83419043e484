"""Engines that moved between backends keep working under their old names: in saved plans and in requests.

Each backend declares what it took over (`Backend.renames`); nothing here knows a backend by name.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from .plan import Plan, Request


def _table(backends: Mapping[str, Any]) -> dict[tuple[str, str], tuple[str, str]]:
    return {old: (name, new) for name, b in backends.items() for old, new in (getattr(b, "renames", None) or {}).items()}


def renamed_plan(plan: Plan, backends: Mapping[str, Any]) -> Plan:
    """The plan (and its alternatives) under the current backend and engine names."""
    table = _table(backends)
    alternatives = tuple(renamed_plan(a, backends) for a in plan.alternatives)
    new = table.get((plan.backend, plan.engine))
    if new is None:
        return plan.replace(alternatives=alternatives) if alternatives != plan.alternatives else plan
    note = f"saved as {plan.backend} ({plan.engine}): now {new[0]} ({new[1]})"
    return plan.replace(backend=new[0], engine=new[1], alternatives=alternatives, history=plan.history + (note,))


def renamed_request(request: Request, backends: Mapping[str, Any]) -> Request:
    """--backend/--engine under an old name: the backend and engine that run it now."""
    if not request.engine:
        return request
    wanted, _, variant = request.engine.partition(":")
    table = _table(backends)
    olds = [old for old in table if old[1] == wanted and request.backend in (None, old[0])]
    current = any(wanted in (getattr(b, "engine_names", ()) or ()) for n, b in backends.items()
                  if request.backend in (None, n))
    if not olds or current:  # an engine of that name exists: it is meant
        return request
    backend, engine = table[olds[0]]
    return replace(request, backend=backend, engine=engine + (":" + variant if variant else ""))
