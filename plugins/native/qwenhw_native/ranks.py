"""The native backend's torchrun job for tensor-parallel and replica plans (one process per GPU); see
qwenhw.engine.ranks."""

from __future__ import annotations

import torch

from qwenhw.engine.ranks import serve_ranks


def main() -> None:
    import qwenhw_native

    serve_ranks(qwenhw_native, "qwenhw-native", "native", "nccl" if torch.cuda.is_available() else "gloo")


if __name__ == "__main__":
    main()
