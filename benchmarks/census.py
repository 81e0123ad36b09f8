"""Load-independent counters for the benchmarks: ATen operators, host syncs, Python calls and live tensor bytes.

Wall-clock times on a shared machine move with the load; what a piece of code *does* does not. `Census` is a
`TorchDispatchMode` that sees every ATen operator call (below autograd, so composite ops are counted as the kernels
they decompose into) and records, per call site:

* the operator count, and the operators that force a host sync on an accelerator (`SYNC_OPS`: `.item()`, `int()`,
  `bool()` of a tensor, data-dependent output shapes such as `nonzero` or boolean indexing);
* the bytes of every new storage an operator returns and when it dies, so that the peak of live tensor bytes and
  what is live at that peak can be compared between two runs (kernel-internal scratch that is never a tensor is
  not seen, as with torch.profiler's memory timeline).

A call site is the innermost frame of the stack that lies in this repository or in transformers' model code
(`file:function`), so that the same backbone code gets the same label in the base model and in Vedas.
Python calls are counted with `sys.setprofile` (`count_python_calls`), separately, since the profile hook slows
everything down.
"""

import collections
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
# operators whose result the host must wait for on an accelerator: a scalar read, or an output whose shape depends
# on the values (nonzero and what decomposes into it: boolean indexing, masked_select)
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2",
            "repeat_interleave", "item"}
_PLACES = (str(REPO), "transformers/models/", "transformers/integrations/", "transformers/masking_utils",
           "transformers/generation/", "transformers/cache_utils")


_COUNTED = {}  # co_filename -> whether its frames are call sites


def _counted(path: str) -> bool:
    """Whether frames of `path` are call sites. The path is resolved (once per file), so that the package imported
    through a symlink to this checkout (`vedas` -> the repository root) still counts as this repository."""
    counted = _COUNTED.get(path)
    if counted is None:
        resolved = str(Path(path).resolve()) if path and not path.startswith("<") else path
        counted = _COUNTED[path] = not path.endswith("census.py") and any(
            place in candidate for place in _PLACES for candidate in (path, resolved))
    return counted


def call_site() -> str:
    """`file:function` of the innermost frame in this repository or in transformers' model and generation code."""
    frame = sys._getframe(2)
    while frame is not None:
        if _counted(frame.f_code.co_filename):
            return f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "(other)"


class Census(TorchDispatchMode):
    """Counts operators and syncs, and tracks live tensor bytes, while active (`with Census() as census:`)."""

    def __init__(self, track_memory: bool = True, sites: bool = True):
        super().__init__()
        self.track_memory, self.sites = track_memory, sites
        self.ops = collections.Counter()  # (op name, site) -> calls
        self.syncs = collections.Counter()  # (op name, site) -> calls
        self.allocated = collections.Counter()  # site -> bytes of new storages
        self.allocations = 0
        self.live = 0
        self.peak = 0
        self.peak_sites = collections.Counter()
        self._storages = {}  # storage data_ptr -> [bytes, site, live tensor count]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        site = call_site() if self.sites else ""
        self.ops[(name, site)] += 1
        if name in SYNC_OPS or (name == "index" and _bool_index(args)):
            self.syncs[(name, site)] += 1
        if self.track_memory:
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor) and t.device.type != "meta"}
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                    self._track(tensor, site, inputs)
        return out

    def _track(self, tensor, site, inputs):
        """Count `tensor`'s storage as live until the last tensor that this census saw on it dies. An output on an
        input's storage (a view, an in-place op) is new memory only if that storage is; one that existed before the
        census (weights, the caller's inputs) is not counted at all."""
        storage = tensor.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        entry = self._storages.get(ptr)
        if entry is None and ptr in inputs:
            return
        if entry is None:  # a new storage: the op allocated it
            entry = self._storages[ptr] = [size, site, 0]
            self.allocated[site] += size
            self.allocations += 1
            self.live += size
            if self.live > self.peak:
                self.peak = self.live
                self.peak_sites = self._live_by_site()
        entry[2] += 1
        weakref.finalize(tensor, self._release, ptr)

    def _release(self, ptr):
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] == 0:
            self.live -= entry[0]
            del self._storages[ptr]

    def _live_by_site(self):
        live = collections.Counter()
        for size, site, _ in self._storages.values():
            live[site] += size
        return live

    # ---------------------------------------------------------------- summaries
    def total_ops(self) -> int:
        return sum(self.ops.values())

    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def ops_by_site(self) -> collections.Counter:
        by_site = collections.Counter()
        for (_, site), calls in self.ops.items():
            by_site[site] += calls
        return by_site


def _bool_index(args) -> bool:
    """Whether an `aten.index` call indexes with a boolean mask (which becomes a `nonzero`: a sync)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def count_python_calls(fn):
    """(Python function calls made while running `fn`, its result): a load-independent measure of Python work."""
    calls = 0

    def hook(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(hook)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return calls, result


def run_census(fn, **kwargs):
    """(Census of `fn`, its result). Objects `fn` returns stay live, so a peak reads like an in-place run's."""
    with Census(**kwargs) as census:
        result = fn()
    return census, result


def per_step(low, high, steps_low: int, steps_high: int) -> dict:
    """What one more latent step costs: `(high - low) / (steps_high - steps_low)` for every counter of two runs
    (`Census` objects and Python call counts in dicts with the same keys)."""
    span = steps_high - steps_low
    return {key: (high[key] - low[key]) / span for key in low}
