"""The engines of the offload backend, by what each runs. Pure: the planner and the loader both name them."""

from __future__ import annotations

import enum


class Engine(str, enum.Enum):
    TRANSFORMERS = "transformers"  # generate() on the CPU, or on a GPU with accelerate offloading to RAM and disk
    DEEPSPEED_ZERO3 = "deepspeed-zero3"  # parameters in host RAM or NVMe, gathered layer by layer

    def __str__(self) -> str:
        return self.value
