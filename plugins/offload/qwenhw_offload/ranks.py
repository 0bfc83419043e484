"""The offload backend's torchrun job for transformers-tp and -dp plans (one process per GPU); see qwenhw.engine.ranks."""

from __future__ import annotations

import torch

from qwenhw.engine.ranks import serve_ranks


def main() -> None:
    import qwenhw_offload

    serve_ranks(qwenhw_offload, "qwenhw-offload", "offload", "nccl" if torch.cuda.is_available() else "gloo")


if __name__ == "__main__":
    main()
