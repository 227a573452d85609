"""How a wall-clock budget becomes a step count, so that a time-budgeted run is reproducible.

A run with ``time_budget`` times its first steps and then fixes its length (:class:`BudgetPlan`): from
there on it *is* the run of that many steps, learning-rate schedule included, so a run stopped anywhere
and resumed continues exactly as the uninterrupted one would have. The plan is made while every step so
far was a warmup step, whose learning rate does not depend on the run's length: at the end of warmup, or
once a tenth of the budget is spent if that comes first. It times the steps after the first (which pays
one-off costs) unless warmup is that short. Evaluations and checkpoints after the plan are not in its
estimate, and a machine that slows down does not shorten the run, so a run can end after its budget.
"""

from __future__ import annotations

import dataclasses

PLAN_AT_BUDGET_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    budget: float  # the time_budget (seconds) the plan was made for
    steps: int  # the run's length in optimizer steps
    seconds_per_step: float  # as timed when the plan was made

    def for_budget(self, budget: float | None, step: int, elapsed: float) -> BudgetPlan | None:
        """This plan, or one re-made from its timing for a budget changed on resume (counted from the run's start)."""
        if budget is None or budget == self.budget:
            return self if budget is not None else None
        return BudgetPlan(budget, _steps_left(budget, step, elapsed, self.seconds_per_step), self.seconds_per_step)


class BudgetPlanner:
    """Makes a run's plan after a step, from the speed of this process's steps (from its second one on)."""

    def __init__(self, budget: float, warmup_steps: int, step: int, elapsed: float):
        self.budget, self.warmup_steps = budget, warmup_steps
        self._start = (step, elapsed)  # where this process started
        self._timed_from = self._start  # after its first step, once taken: that one pays one-off costs

    def plan(self, step: int, elapsed: float) -> BudgetPlan | None:
        """The plan after ``step`` steps (``elapsed`` seconds into the run), or None while the next step is a
        warmup step and less than a tenth of the budget is spent."""
        if step == self._start[0] + 1:
            self._timed_from = (step, elapsed)
        if step == 0 or (step < self.warmup_steps and elapsed < PLAN_AT_BUDGET_FRACTION * self.budget):
            return None
        if step == self._start[0]:  # resumed past warmup without a plan (older checkpoints): the run's own pace
            first_step, since = 0, 0.0
        else:
            first_step, since = self._timed_from if step > self._timed_from[0] else self._start
        per_step = max(elapsed - since, 1e-9) / (step - first_step)
        return BudgetPlan(self.budget, _steps_left(self.budget, step, elapsed, per_step), per_step)


def _steps_left(budget: float, step: int, elapsed: float, per_step: float) -> int:
    return step + max(0, int((budget - elapsed) / per_step))
