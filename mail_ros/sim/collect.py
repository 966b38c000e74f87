"""Episode bookkeeping for ``mail-ros collect`` and ``mail-ros demo`` (no ROS, no MuJoCo).

:func:`schedule` lays out the episodes of a run, instruction-interleaved so that a run cut short
still covers every instruction; :class:`EpisodeOutcome` records one episode and
:class:`SuccessTable` turns outcomes into the per-instruction success table both commands print.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mail_ros.sim.tasks import Task, TaskProgress

__all__ = ["CollectError", "EpisodeOutcome", "EpisodeSpec", "SuccessTable", "percentiles_ms", "schedule"]


class CollectError(ValueError):
    """An episode plan or result is invalid."""


@dataclass(frozen=True)
class EpisodeSpec:
    """Episode ``index`` (0-based) of a run: ``instruction`` given to the robot, ``task`` judged.

    The instruction is the task's own text unless it is a paraphrase.
    """

    index: int
    task: Task
    instruction: str

    def __post_init__(self) -> None:
        if self.index < 0:
            raise CollectError(f"episode index must be >= 0, got {self.index}")
        if not self.instruction.strip():
            raise CollectError(f"episode {self.index}: empty instruction")


def schedule(instructions: Sequence[tuple[str, Task]], per_instruction: int, start: int = 0) -> list[EpisodeSpec]:
    """``per_instruction`` episodes of each (instruction, task), round-robin, indices from ``start``."""
    if per_instruction < 1:
        raise CollectError(f"episodes per instruction must be >= 1, got {per_instruction}")
    if not instructions:
        raise CollectError("no instructions to schedule")
    texts = [text for text, _ in instructions]
    if len(set(texts)) != len(texts):
        raise CollectError(f"instructions must be distinct, got {texts}")
    specs = []
    for _ in range(per_instruction):
        for text, task in instructions:
            specs.append(EpisodeSpec(start + len(specs), task, text))
    return specs


@dataclass(frozen=True)
class EpisodeOutcome:
    """What happened in one episode: success, simulated seconds to the end, steps or chunks."""

    spec: EpisodeSpec
    success: bool
    seconds: float  # simulated time from the instruction to success or to the budget
    note: str = ""
    progress: TaskProgress | None = None  # the simulator's last verdict (the failure stage)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise CollectError(f"episode {self.spec.index}: seconds must be finite and >= 0, got {self.seconds}")


@dataclass
class SuccessTable:
    """Per-instruction success of a set of episodes, in first-seen instruction order."""

    outcomes: list[EpisodeOutcome] = field(default_factory=list)

    def add(self, outcome: EpisodeOutcome) -> None:
        self.outcomes.append(outcome)

    def rows(self) -> list[tuple[str, int, int, float]]:
        """(instruction, successes, episodes, mean simulated seconds of the successes; nan if none)."""
        order: dict[str, list[EpisodeOutcome]] = {}
        for outcome in self.outcomes:
            order.setdefault(outcome.spec.instruction, []).append(outcome)
        rows = []
        for text, outcomes in order.items():
            wins = [o.seconds for o in outcomes if o.success]
            rows.append((text, len(wins), len(outcomes), float(np.mean(wins)) if wins else math.nan))
        return rows

    def rate(self, skill: str | None = None) -> float:
        """Success fraction over all episodes (or those of one skill); nan without episodes."""
        chosen = [o for o in self.outcomes if skill is None or o.spec.task.skill == skill]
        return sum(o.success for o in chosen) / len(chosen) if chosen else math.nan

    def failure_stages(self, skill: str) -> list[tuple[str, int]]:
        """How the failed episodes of ``skill`` ended: (stage, count), most frequent first."""
        counts = Counter(o.progress.stage if o.progress is not None else "unknown"
                         for o in self.outcomes if o.spec.task.skill == skill and not o.success)
        return counts.most_common()

    def format(self, title: str) -> str:
        """The table as text: one line per instruction, per-skill lines, then the overall rate."""
        rows = self.rows()
        width = max([len(title)] + [len(text) for text, *_ in rows])
        lines = [f"{title:<{width}}  success        time to success", "-" * (width + 34)]
        for text, wins, total, seconds in rows:
            time_text = f"{seconds:5.1f} s" if wins else "    -"
            lines.append(f"{text:<{width}}  {wins:3d}/{total:<3d} {100 * wins / total:5.1f} %   {time_text}")
        lines.append("-" * (width + 34))
        for skill in sorted({o.spec.task.skill for o in self.outcomes}):
            chosen = [o for o in self.outcomes if o.spec.task.skill == skill]
            wins = sum(o.success for o in chosen)
            line = f"{'all ' + skill:<{width}}  {wins:3d}/{len(chosen):<3d} {100 * wins / len(chosen):5.1f} %"
            if failures := self.failure_stages(skill):
                line += "   failed: " + ", ".join(f"{stage} {count}" for stage, count in failures)
            lines.append(line)
        return "\n".join(lines)


def percentiles_ms(seconds: Sequence[float], quantiles: Sequence[float] = (50, 99)) -> list[float]:
    """Percentiles of durations given in seconds, in milliseconds (nan for an empty list)."""
    if len(seconds) == 0:
        return [math.nan for _ in quantiles]
    return [float(v) for v in np.percentile(np.asarray(seconds, dtype=np.float64) * 1e3, list(quantiles))]
