"""Checks every engine runs before it loads weights: the files exist, the plan's budgets hold here.

A plan made on another machine (or with a budget below the weights) fails here with MemoryError, which
`qwenhw.load` treats like an out-of-memory error: it falls back to the next-ranked plan.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import BadInput
from ..hardware.profile import GiB


def checkpoint_dir(plan: Any) -> str:
    """The local checkpoint the plan loads, or a BadInput naming where we looked and how to download."""
    path = plan.model_path
    if path and os.path.isdir(path):
        return path
    from ..models.resolve import missing_weights_message
    from ..models.spec import ModelSpec

    spec = ModelSpec.from_dict(plan.spec) if plan.spec else None
    if spec is None:
        raise BadInput(f"The plan for {plan.model} names no checkpoint directory; plan a local directory instead.")
    raise BadInput(missing_weights_message(spec))


def check_budgets(plan: Any) -> None:
    """Raise MemoryError when a device's predicted use exceeds what the plan allows it."""
    for dev in plan.devices:
        if dev.kind == "disk":
            continue
        if dev.total_gib > dev.capacity_gib * 1.001:
            raise MemoryError(
                f"out of memory on {dev.id}: the plan needs {dev.total_gib:.2f} GiB but its budget is "
                f"{dev.capacity_gib:.2f} GiB"
            )
    cpu = next((d for d in plan.devices if d.kind == "cpu"), None)
    if cpu is not None:
        import psutil

        available = psutil.virtual_memory().available / GiB
        if cpu.total_gib > available:
            raise MemoryError(
                f"out of memory on cpu: the plan needs {cpu.total_gib:.2f} GiB of RAM, {available:.2f} GiB is "
                f"available now"
            )
