"""How a wall-clock budget becomes a step count, so that a time-budgeted run resumes exactly.

A run with ``time_budget`` trains its warmup and then holds the peak learning rate while it times its steps
(evaluations and checkpoints included) until a tenth of the budget is spent. Then it fixes its length
(:class:`BudgetPlan`): from there on the learning rate follows a cosine from the plan's step to its last
step, and the run ends there. Everything after the plan depends on the plan alone, which every checkpoint
keeps, so a run stopped anywhere and resumed continues exactly as the uninterrupted one would have (one
stopped before its plan makes its own when it gets there). A machine that slows down after the plan does
not shorten the run, so a run can end after its budget.
"""

from __future__ import annotations

import dataclasses

PLAN_AT_BUDGET_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    budget: float  # the time_budget (seconds) the plan was made for
    start: int  # the step it was made at: the cosine schedule runs from here
    steps: int  # the run's length in optimizer steps
    seconds_per_step: float  # as timed before the plan

    @classmethod
    def from_state(cls, data: object) -> BudgetPlan:
        """The plan a checkpoint saved (``dataclasses.asdict``); ValueError if ``data`` is not one."""
        names = [f.name for f in dataclasses.fields(cls)]
        if (
            not isinstance(data, dict)
            or len(data) != len(names)
            or any(type(data.get(n)) not in (int, float) for n in names)
        ):
            raise ValueError(f"not a budget plan: {data!r}")
        return cls(float(data["budget"]), int(data["start"]), int(data["steps"]), float(data["seconds_per_step"]))

    def progress(self, step: int) -> float:
        """How far the schedule is at ``step``: 0 at the plan's step, 1 at its last."""
        return (step - self.start) / max(self.steps - self.start, 1)

    def for_budget(self, budget: float | None, step: int, elapsed: float) -> BudgetPlan | None:
        """This plan, or one re-made from its timing for a budget changed on resume (counted from the run's start)."""
        if budget is None or budget == self.budget:
            return self if budget is not None else None
        steps = _steps_in(budget, step, elapsed, self.seconds_per_step)
        return dataclasses.replace(self, budget=budget, steps=steps)


class BudgetPlanner:
    """Makes a run's plan after a step, from the pace of this process's steps after its first one."""

    def __init__(self, budget: float, warmup_steps: int, max_steps: int, step: int, elapsed: float):
        self.budget, self.warmup_steps, self.max_steps = budget, warmup_steps, max_steps
        self._start = (step, elapsed)  # where this process started
        self._timed_from = self._start  # after its first step, once taken: that one pays one-off costs

    def plan(self, step: int, elapsed: float) -> BudgetPlan | None:
        """The plan after ``step`` steps (``elapsed`` seconds into the run); None during warmup and until a
        tenth of the budget is spent."""
        if step == self._start[0] + 1:
            self._timed_from = (step, elapsed)
        if step == 0 or step < self.warmup_steps or elapsed < PLAN_AT_BUDGET_FRACTION * self.budget:
            return None
        first_step, since = self._timed_from if step > self._timed_from[0] else self._start
        if step == first_step:  # no step timed in this process (resumed late): the whole run's pace
            first_step, since = 0, 0.0
        per_step = max(elapsed - since, 1e-9) / (step - first_step)
        steps = min(self.max_steps, _steps_in(self.budget, step, elapsed, per_step))
        return BudgetPlan(self.budget, step, steps, per_step)


def _steps_in(budget: float, step: int, elapsed: float, per_step: float) -> int:
    return step + max(0, int((budget - elapsed) / per_step))
