"""Device memory of a compiled program against what the device holds: the check that a step fits.

XLA's memory analysis of a compiled program is exact per device (arguments, outputs, temporaries),
so a step is checked before it runs, on the real devices or on a TPU topology compiled on any host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dit.errors import UserError

# What XLA lets one device's program use on TPUs (GiB, as libtpu's "exceeds available HBM (15.48G)"
# says), for topologies compiled ahead of time, whose devices report no memory stats. Read from those
# messages with libtpu 0.0.42.1 (2026-12-04). v4's topology descriptions list 2 devices per chip.
TPU_USABLE_BYTES = {kind: gib * 2**30 for kind, gib in {
    "TPU v2": 7.48, "TPU v3": 15.48, "TPU v4": 15.25, "TPU v5 lite": 15.75, "TPU v5": 95.74,
    "TPU v6 lite": 31.25}.items()}

# A step may use at most this fraction of a device: the rest is for the allocator's fragmentation, the
# input batches in flight and the runtime's own buffers.
HEADROOM = 0.2

CAPACITY_ENV = "DIT_DEVICE_MEMORY_GB"  # overrides the capacity of every device (tests, shared GPUs)


class DoesNotFit(UserError):
    """A training step needs more memory than the device has."""


def device_capacity(device) -> float | None:
    """Bytes one program may use on `device`: the override, the runtime's limit, the TPU table, or the
    host's memory for the CPU; None where nothing says."""
    if os.environ.get(CAPACITY_ENV):
        return float(os.environ[CAPACITY_ENV]) * 1e9
    try:
        stats = device.memory_stats() or {}
    except Exception:  # devices of a topology description (ahead-of-time targets) have no stats
        stats = {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    if device.platform == "tpu":
        for kind, capacity in sorted(TPU_USABLE_BYTES.items(), key=lambda kv: -len(kv[0])):
            if device.device_kind.startswith(kind):
                return capacity
        return None
    if device.platform == "cpu":
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return None


@dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled program."""

    arguments: int
    outputs: int  # outputs that do not reuse a donated argument's buffer
    temporaries: int
    capacity: float | None

    @classmethod
    def of(cls, compiled, device) -> "StepMemory":
        analysis = compiled.memory_analysis()
        outputs = analysis.output_size_in_bytes - analysis.alias_size_in_bytes
        return cls(analysis.argument_size_in_bytes, outputs, analysis.temp_size_in_bytes, device_capacity(device))

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries

    @property
    def fits(self) -> bool:
        """True when the program fits in the device (None capacity: nothing to check against)."""
        return self.capacity is None or self.total <= self.capacity

    @property
    def fits_with_headroom(self) -> bool:
        return self.capacity is None or self.total <= (1 - HEADROOM) * self.capacity

    @property
    def headroom(self) -> float | None:
        """The fraction of the device left free (negative: over by that fraction)."""
        return None if self.capacity is None else 1 - self.total / self.capacity

    def describe(self) -> str:
        used = (f"{self.total / 1e9:.2f} GB per device (arguments {self.arguments / 1e9:.2f}, temporaries "
                f"{self.temporaries / 1e9:.2f}, outputs {self.outputs / 1e9:.2f})")
        if self.capacity is None:
            return used + " of an unknown capacity"
        return used + f" of {self.capacity / 1e9:.2f} GB: {100 * self.headroom:.0f}% headroom"
