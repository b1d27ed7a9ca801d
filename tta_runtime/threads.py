"""How many CPU threads one request runs on: chosen from the work size, shared between the Runtimes at work.

PyTorch's default is one intra-op thread per core. For the small models this runtime ships that is the wrong
default: their operations are too short to split well, and on a machine where something else is running (a
server's other workers, a video decoder, a browser) a parallel operation waits for its slowest thread, which
shares a core with the other work. Measured on a 2-core machine with one core busy: 4.1x the idle time with two
threads, about the idle time with one (`tta-runtime bench overhead`, "busy_core").

The policy (`RuntimeOptions.threads`; None = this automatic choice):
- the work of a request is the model's forward FLOPs per image (counted once, on a blank input of the card's
  size, with `torch.utils.flop_counter`) times the images of the request;
- one thread per `FLOPS_PER_THREAD` of that work, at least 1;
- at most the cores this process may use (`os.sched_getaffinity`) divided by the number of Runtimes working at
  that moment in this process, so several Runtimes or server workers never ask for more threads than cores.

An explicit `threads=N` is used as given. Either way the thread count is set for the request only (on CUDA
nothing is set: the GPU does the work) and the caller's setting is restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Iterator

import torch

__all__ = ["FLOPS_PER_THREAD", "ThreadPolicy", "usable_cores"]

log = logging.getLogger(__name__)

FLOPS_PER_THREAD = 4e9
"""Work (forward FLOPs of one request) that pays for one more thread. The shipped models need 0.01-0.9 GFLOP per
image: one thread for a single image, more only for large batches of large inputs."""

_active = 0  # Runtimes inside a request in this process
_active_lock = threading.Lock()


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def forward_flops(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """FLOPs of one forward of `model` on one blank (1, 3, size, size) image; inf when it cannot be counted."""
    from torch.utils.flop_counter import FlopCounterMode

    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}  # a forward may move statistics: not this one
    try:  # with autograd on: FlopCounterMode's module tracker needs grad functions (one small forward's graph)
        with torch.enable_grad(), FlopCounterMode(display=False, depth=None) as counter:
            model(torch.zeros(1, 3, size, size, device=device))
        return float(counter.get_total_flops())
    except Exception as e:  # a user's model that does not run on a blank image: assume it is large
        log.info("could not count the model's FLOPs (%s: %s); threads sized as for a large model", type(e).__name__, e)
        return math.inf
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in buffers and b.shape == buffers[k].shape:
                    b.copy_(buffers[k])


class ThreadPolicy:
    """A Runtime's thread choice per request (see the module's docstring)."""

    def __init__(self, model: torch.nn.Module, size: int, device: torch.device, threads: int | None) -> None:
        self.model, self.size, self.device, self.fixed = model, size, device, threads
        self._flops: float | None = None  # per image, counted on first use

    @property
    def flops_per_image(self) -> float:
        if self._flops is None:
            self._flops = forward_flops(self.model, self.size, self.device)
        return self._flops

    def choose(self, images: int, active: int = 1) -> int:
        """Threads for a request of `images` images while `active` Runtimes (this one included) are working."""
        if self.fixed is not None:
            return self.fixed
        share = max(1, usable_cores() // max(1, active))
        work = self.flops_per_image * max(1, images)
        return share if math.isinf(work) else max(1, min(share, int(work // FLOPS_PER_THREAD) + 1))

    @contextlib.contextmanager
    def request(self, images: int) -> Iterator[int]:
        """Run the block on the chosen number of intra-op threads; the caller's setting comes back afterwards."""
        global _active
        if self.device.type != "cpu":
            yield torch.get_num_threads()
            return
        with _active_lock:
            _active += 1
            active = _active
        before = torch.get_num_threads()
        n = self.choose(images, active)
        try:
            if n != before:
                torch.set_num_threads(n)
            yield n
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
            with _active_lock:
                _active -= 1
