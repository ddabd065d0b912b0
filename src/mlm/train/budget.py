"""train.budget: fit a run's step count to a wall-time or token budget.

A time budget is measured on the first real steps (then taken back), so the step count is fixed from the
speed measured at the start: a machine whose load changes after the timing ends the run early or late, and
the end of the run says by how much and why. `s` is the run's `pretrain.Setup`; `train_step(s, step)` and
`evaluate(s)` are the loop's own, passed in so the timing measures exactly what training will run; `clock`
is the timer (seconds), passed in so a test can control it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlm import dist
from mlm.config import PretrainConfig, parse_budget
from mlm.errors import UserError
from mlm.train.checkpoint import checkpoint_dirs, rng_state, set_rng_state
from mlm.train.run_folder import recorded_train

MIN_TIMED_STEPS = 5
"""Steps counted by the timing (after the first, which pays for compilation and allocation): a median of
fewer follows one slow step."""
MAX_TIMED_STEPS = 200
TIMING_SHARE = 0.05
"""The timing runs at least this share of the budget (up to TIMING_MAX_S): a short window measures the load of
one moment, and a burst of load from another process during it set 7× too few steps."""
TIMING_MAX_S = 30.0
TIMING_LIMIT_SHARE = 0.2
"""Slow steps stop the timing at this share of the budget, so it never spends the budget it measures for."""
ON_BUDGET = 0.1
"""Training that ends within this share of the budget is on budget; beyond it the end of the run says why."""
UNSTEADY = 2.0
"""Timed steps this many times apart (slowest / fastest) mean a machine whose load changes: the start says the
budget may be missed (the speed measured then is no forecast)."""


@dataclass
class BudgetPlan:
    """What a time budget's step count was fixed from, for the end-of-run line."""

    budget: str
    """train.budget as given ("90s")."""
    seconds: float
    """The budget in seconds."""
    timing_s: float
    """Seconds spent timing the first steps (part of the budget: those steps are taken back)."""
    step_s: float
    """Seconds per training step measured at the start."""
    eval_s: float
    """Seconds per evaluation measured at the start (0 without evaluations)."""
    steps: int
    """The step count fixed from them."""


def recorded_budget_fit(cfg: PretrainConfig, run_dir: Path) -> PretrainConfig:
    """A run folder whose run was fitted to a train.budget keeps the steps and warm-up fixed then, so a
    resumed (or requeued) run has the schedule it started with: when the same budget is given, and when none
    is given to a run that has checkpoints (continuing it needs no repeat of the budget)."""
    recorded = recorded_train(run_dir)
    budget = recorded.get("budget")
    if not budget or not isinstance(budget, str):
        return cfg
    if cfg.train.budget != budget and (cfg.train.budget or not checkpoint_dirs(run_dir)):
        return cfg  # another budget, or a folder with nothing to continue: check_run_dir names the difference
    try:
        train = dataclasses.replace(cfg.train, steps=recorded["steps"], warmup_steps=recorded["warmup_steps"],
                                    budget=budget)
    except (KeyError, TypeError, UserError):
        return cfg  # a damaged record: check_run_dir names the difference
    return dataclasses.replace(cfg, train=train)


def fit_token_budget(cfg: PretrainConfig, log) -> PretrainConfig:
    """A token budget ("5e9 tokens") fixes the steps by arithmetic alone: done before the run folder is made,
    so a budget that fits no step leaves nothing behind. A time budget is returned unchanged."""
    tokens = parse_budget(cfg.train.budget)[1]
    if tokens is None:
        return cfg
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    steps = int(tokens // tokens_per_step)
    return _fixed(cfg, steps, f"{tokens:,.0f} tokens at {tokens_per_step:,} tokens per step", log)


def fit_to_budget(s, log, train_step, evaluate, clock: Callable[[], float] = time.perf_counter) -> BudgetPlan:
    """A time budget: set s.cfg.train.steps to what fits, and scale train.warmup_steps by the same ratio so
    the schedule (warm-up, then decay to 0) ends where the budget does."""
    cfg = s.cfg
    seconds = parse_budget(cfg.train.budget)[0]
    started = clock()
    step_s, eval_s, timed, spread = time_first_steps(
        s, train_step, evaluate, min_seconds=min(TIMING_MAX_S, TIMING_SHARE * seconds),
        max_seconds=TIMING_LIMIT_SHARE * seconds, clock=clock)
    timing_s = clock() - started
    remaining = seconds - timing_s
    evals_per_step = eval_s / cfg.eval.every if cfg.eval.every else 0.0
    # The evaluations at step 0 and at the last step come on top of one every eval.every steps.
    steps = int((remaining - 2 * eval_s) // (step_s + evals_per_step))
    how = (f"{remaining:,.1f}s left after timing {timed} step{'s' if timed != 1 else ''} at {step_s:.3g}s per step"
           + (f" and {eval_s:.3g}s per evaluation" if eval_s else "")
           + "; the step count is fixed from this speed")
    s.cfg = _fixed(cfg, steps, how, log)
    if spread >= UNSTEADY:
        log(f"warning: the timed steps were {spread:.1f}× apart (slowest / fastest): the machine's load is changing, "
            "so the run may end well before or after its budget; on a machine shared with other work, fewer threads "
            "(system.threads=1) may give a steadier speed")
    return BudgetPlan(cfg.train.budget, seconds, timing_s, step_s, eval_s, steps)


def _fixed(cfg: PretrainConfig, steps: int, how: str, log) -> PretrainConfig:
    if steps < 1:
        raise UserError(f"train.budget={cfg.train.budget} does not fit one step ({how}): give a larger budget")
    warmup = round(cfg.train.warmup_steps * steps / cfg.train.steps)
    log(f"budget {cfg.train.budget}: {how} → train.steps={steps:,}, train.warmup_steps={warmup:,}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, warmup_steps=warmup))


def time_first_steps(s, train_step, evaluate, min_seconds: float, max_seconds: float,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, int, float]:
    """(seconds per training step, seconds per evaluation, steps timed, slowest / fastest step counted),
    measured on real steps that are
    then taken back: the model, the optimizer and the random streams are set back to where they were, so
    the run that follows is the one a fixed train.steps would give.

    The first step and the first evaluation (compilation, allocation: the run that follows reuses them) are
    not counted; the steps' median over at least `min_seconds` is (robust to a slow outlier); slow steps stop
    the timing at `max_seconds`. The slowest rank's figures count."""
    saved = s.engine.copy_state()
    rng = rng_state(s.device)
    times: list[float] = []
    started = clock()
    for step in range(MAX_TIMED_STEPS + 1):
        begin = clock()
        loss, _, _ = train_step(s, step)
        loss.item()  # wait for the device
        times.append(clock() - begin)
        elapsed = clock() - started
        if len(times) > MIN_TIMED_STEPS and elapsed >= min_seconds:
            break
        if len(times) > 1 and elapsed >= max_seconds:
            break
    eval_s = 0.0
    if s.cfg.eval.every and s.validation is not None:
        evals = []
        for _ in range(2):  # the first pays for compilation and allocation; the faster of two counts
            begin = clock()
            evaluate(s)
            evals.append(clock() - begin)
            if clock() - started >= max_seconds:
                break
        eval_s = min(evals[1:] or evals)
    s.engine.restore_state(saved)
    set_rng_state(rng, s.device)
    counted = times[1:] or times
    step_s = sorted(counted)[len(counted) // 2]
    spread = max(counted) / max(min(counted), 1e-9)
    step_s, eval_s, spread = dist.max_across_ranks([step_s, eval_s, spread], s.info)
    return step_s, eval_s, len(times), spread


def budget_report(plan: BudgetPlan, trained_s: float, steps: int, evaluations: int) -> str:
    """The end of a budgeted run: the budget, the time the training used (the timing, the steps and the
    evaluations; not the setup or the checkpoint writing) and why they differ."""
    used = plan.timing_s + trained_s
    head = (f"budget {plan.budget}: training used {used:,.1f}s (timing {plan.timing_s:,.1f}s + {steps:,} "
            f"step{'s' if steps != 1 else ''} and {evaluations} evaluation{'s' if evaluations != 1 else ''} "
            f"{trained_s:,.1f}s)")
    step_s = trained_s / steps if steps else 0.0  # evaluations included: as the plan counts them
    planned_s = plan.step_s + (plan.eval_s * evaluations / steps if steps else 0.0)
    if abs(used - plan.seconds) <= ON_BUDGET * plan.seconds:
        return f"{head}, within {ON_BUDGET:.0%} of the budget"
    return (f"{head}: {'less' if used < plan.seconds else 'more'} than the budget because the steps took "
            f"{step_s:.3g}s each (evaluations included) against the {planned_s:.3g}s measured at the start, and the "
            "step count is fixed from the speed measured at the start: the machine's speed changed after the "
            "timing (on a shared machine, other processes' load)")
