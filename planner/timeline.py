"""A simulated step as data: spans on lanes (schedule.LANES) and the device memory they allocate (simulate.py makes
it, plan.py and report.py read it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    lane: str
    kind: str
    layer: int
    start: float
    end: float
    nbytes: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    spans: list[Span] = field(default_factory=list)
    gpu_mem: list[tuple[float, int]] = field(default_factory=list)  # (time, +/- bytes) of device allocations
    gpu_base_bytes: int = 0  # held the whole step: resident weights and the weight slots

    @property
    def step_time_s(self) -> float:
        return max(s.end for s in self.spans)

    def busy_s(self, lane: str, kind: str | None = None) -> float:
        return sum(s.duration for s in self.spans if s.lane == lane and (kind is None or s.kind == kind))

    def gpu_curve(self) -> list[tuple[float, int]]:
        """(time, allocated bytes) after each change; frees at an instant count before allocations."""
        level, curve = self.gpu_base_bytes, [(0.0, self.gpu_base_bytes)]
        for t, d in sorted(self.gpu_mem):
            level += d
            curve.append((t, level))
        return curve

    @property
    def gpu_peak_bytes(self) -> int:
        return max(level for _, level in self.gpu_curve())
