"""The tensor-parallel sum of row-parallel outputs (o_proj, the experts' sums), and with it the RMSNorm that
reads the sum next, over torch's symmetric memory where it can be set up, torch.distributed elsewhere."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .config import KernelConfig
from .kernels import common, reduce
from .limits import FUSE_MAX_REMOTE_ROWS, PUSH_MAX_REMOTE_ROWS, fuses_reduce


class Reducer:
    """Sums a row-parallel output over the tensor-parallel group.

    Decode-sized tensors on GPUs go through torch's symmetric memory: the producer writes its partial sum
    straight into a buffer its peers map over NVLink (`buffer_like`), and one kernel reads all of them
    (one-shot all-reduce). Measured inside CUDA graphs on H200s, for one step's hidden states (batch x
    hidden): 8-12 us with the copy into the buffer, NCCL 7-14 us; without the copy it is one kernel where
    NCCL's in-place all-reduce also is one. Larger tensors (prompts), CPUs, and machines where the buffer
    cannot be set up use `torch.distributed.all_reduce`. KernelConfig.symm_mem=False turns the symmetric path off.

    `reduce_norm` also applies the RMSNorm that reads the sum next, in the same kernel (kernels.reduce.reduce_norm),
    with a single cross-GPU barrier (before its reads; none after). That is safe because
    consecutive reductions alternate between two halves of the buffer (`turn`): a rank writes a half again
    only after every peer has reached the reduction in between, so has finished reading it. `restart()`
    puts the turn back at the start of each forward pass (every pass reduces an even number of times: two
    per layer), so a captured CUDA graph and its replays agree on the halves.
    In 16-bit models each rank instead pushes its partial rows into its peers' memory, flagged word by word,
    and sums what they pushed into its own (kernels.reduce.reduce_norm_push): no barrier and no read across the
    links, where the one-shot kernel waits for a barrier and then reads its peers' rows. The same halves
    keep it safe. KernelConfig.push_reduce=False keeps the one-shot kernel.
    Creating one is collective: every rank of the group must create it at the same point.
    """

    def __init__(self, group: Any, numel: int, dtype: torch.dtype, device: torch.device,
                 kernels: KernelConfig | None = None):
        kernels = kernels or KernelConfig.resolve()
        self.group = group
        self.buf: torch.Tensor | None = None
        self.handle: Any = None
        self.push: Any = None  # the words reduce_norm pushes into (reduce.reduce_norm_push), or None: it pulls
        self.numel = numel
        self.turn = 0
        # fused_reduce off keeps the reduction and the norm apart (torch's one-shot kernel)
        self.fuse = kernels.triton and kernels.fused_reduce
        self.path = "all_reduce"
        if device.type != "cuda" or not kernels.symm_mem:
            return
        try:
            import torch.distributed._symmetric_memory as symm_mem

            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required before torch 2.9, deprecated since
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    symm_mem.enable_symm_mem_for_group(group.group_name)
            buf = symm_mem.empty(2 * numel, dtype=dtype, device=device)
            self.handle = symm_mem.rendezvous(buf, group.group_name)
            self.buf, self.name, self.path = buf, group.group_name, "symmetric-memory one-shot"
            if self.fuse:
                if dtype in (torch.bfloat16, torch.float16) and kernels.push_reduce:
                    words = symm_mem.empty(reduce.push_words(numel, self.handle.world_size), dtype=torch.int64,
                                           device=device)
                    words.zero_()
                    self.push = symm_mem.rendezvous(words, group.group_name)
                    self.push.barrier()  # every rank's words zeroed before any rank pushes
                most = PUSH_MAX_REMOTE_ROWS if self.push else FUSE_MAX_REMOTE_ROWS
                rows = most // max(1, self.handle.world_size - 1)
                self.path += f", fused with the next RMSNorm in decode steps of up to {rows} sequences"
                if self.push:
                    self.path += " (each rank pushing its partial sum to its peers)"
        except Exception as exc:  # older torch, no peer access: NCCL it is
            self.path = f"all_reduce (symmetric memory unavailable: {type(exc).__name__}: {exc})"

    def restart(self) -> None:
        self.turn = 0

    def _fits(self, x: torch.Tensor) -> bool:
        return self.buf is not None and x.numel() <= self.numel and x.dtype == self.buf.dtype

    def _half(self) -> torch.Tensor:
        return self.buf[self.turn * self.numel: (self.turn + 1) * self.numel]

    def buffer_like(self, x: torch.Tensor) -> torch.Tensor:
        """Where a producer writes the partial sum it will reduce: the shared buffer when it fits (no copy)."""
        return self._half()[: x.numel()].view(x.shape) if self._fits(x) else torch.empty_like(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group: `x` itself (reduced in place) or, from the shared buffer, a new tensor."""
        if self._fits(x) and x.is_contiguous():
            part = self._half()[: x.numel()]
            self.turn ^= 1
            out = x
            if x.data_ptr() == part.data_ptr():
                out = torch.empty_like(x)
            else:
                part.copy_(x.view(-1))
            torch.ops.symm_mem.one_shot_all_reduce_out(part, "sum", self.name, out=out.view(-1))
            return out
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def can_fuse(self, x: torch.Tensor, norm: Any) -> bool:
        """Whether `reduce_norm` takes x: written in place by its producer, and a Qwen RMSNorm after it."""
        rows = x.numel() // x.shape[-1]
        push = self._pushes(x)
        return (self.handle is not None and self.fuse and self._fits(x) and x.data_ptr() == self._half().data_ptr()
                and getattr(norm, "variance_epsilon", None) is not None and common.available(x.device)
                and (push or reduce.pad_bytes(rows, x.device) <= self.handle.signal_pad_size)
                and fuses_reduce(rows, self.handle.world_size, push))

    def _pushes(self, x: torch.Tensor) -> bool:
        """Whether `reduce_norm` pushes x (words of two values: an even hidden size) or pulls it."""
        return self.push is not None and x.shape[-1] % 2 == 0

    def unfuse(self, exc: Exception) -> None:
        """reduce_norm failed to build: reduce and normalise apart from now on, and say why in `path`."""
        self.fuse = False
        self.path = f"symmetric-memory one-shot (reduce + RMSNorm kernel unavailable: {type(exc).__name__})"

    def reduce_norm(self, x: torch.Tensor, norm: Any, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over the group, norm(sum)) in one kernel, for x from `buffer_like` (see `can_fuse`)."""
        h, normed = torch.empty_like(x), torch.empty_like(x)
        hidden = x.shape[-1]
        if self._pushes(x):
            reduce.reduce_norm_push(self.push.buffer_ptrs_dev, self.push.rank, self.push.world_size, self.turn,
                                    self.numel // hidden, x.view(-1, hidden), norm.weight, float(norm.variance_epsilon),
                                    h, normed, pdl=pdl)
        else:
            reduce.reduce_norm(self.handle, self.turn * self.numel, x.numel() // hidden, hidden, norm.weight,
                               float(norm.variance_epsilon), h, normed, pdl=pdl)
        self.turn ^= 1
        return h, normed
