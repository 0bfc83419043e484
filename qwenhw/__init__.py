"""qwenhw: run Qwen models well on the hardware you have.

    import qwenhw
    engine = qwenhw.load("Qwen3-30B-A3B")
    print(engine.plan.explain())
    engine.chat([{"role": "user", "content": "2+2?"}], thinking=False)

Importing qwenhw is light: no torch, no engine. Engines are imported by backends when a plan loads.
"""

from .api import detect, load, plan
from .backend import Availability, Backend
from .engine.base import ChatResult, Completion, Engine, Sampling
from .errors import BadInput, DoesNotFit, LoadFailed, QwenhwError
from .hardware.profile import HardwareProfile
from .hookspecs import hookimpl
from .models.spec import ModelSpec
from .planning.plan import DeviceUse, Estimate, Offload, Parallel, Plan, Rejection, Request

__version__ = "0.1.0"

__all__ = [
    "Availability", "Backend", "BadInput", "ChatResult", "Completion", "DeviceUse", "DoesNotFit", "Engine",
    "Estimate", "HardwareProfile", "LoadFailed", "ModelSpec", "Offload", "Parallel", "Plan", "QwenhwError",
    "Rejection", "Request", "Sampling", "detect", "hookimpl", "load", "plan",
]
