"""Reading device results on the host without stalling the device.

`tensor.item()`, `.tolist()` or a blocking `.cpu()` on a CUDA tensor wait until the device has run
*everything* queued so far, so the host queues no new work meanwhile and the device idles when the
wait ends. `HostRead` queues the copy instead (into pinned host memory, `non_blocking`) and records
a CUDA event after it; `get()` waits for that event only, i.e. for the work queued before the copy,
while the work queued after it keeps the device busy. CUDA's sync debug mode
(`torch.cuda.set_sync_debug_mode`) does not count such an event wait: it is not a stream or
device synchronisation. On the CPU (and other devices) the copy is a plain `.cpu()`.
"""
from typing import Optional

import torch


class HostRead:
    """`tensor`'s values on their way to the host; `get()` returns them as a CPU tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self._event: Optional[torch.cuda.Event] = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor.cpu()

    def ready(self) -> bool:
        """Whether get() would return without waiting."""
        return self._event is None or self._event.query()

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host
