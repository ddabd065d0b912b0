"""train.budget: fit a run's step count to a wall-time or token budget.

A time budget is measured on the first real steps (then taken back), so the step count is fixed from the
speed measured at the start. `s` is the run's `pretrain.Setup`; `train_step(s, step)` and `evaluate(s)` are
the loop's own, passed in so the timing measures exactly what training will run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from mlm import dist
from mlm.config import PretrainConfig, parse_budget
from mlm.errors import UserError
from mlm.train.checkpoint import rng_state, set_rng_state
from mlm.train.run_folder import recorded_train


def recorded_budget_fit(cfg: PretrainConfig, run_dir: Path) -> PretrainConfig:
    """A run folder whose run was fitted to this same train.budget keeps the steps and warm-up fixed then,
    so a resumed (or requeued) run has the schedule it started with."""
    recorded = recorded_train(run_dir)
    if not cfg.train.budget or recorded.get("budget") != cfg.train.budget:
        return cfg
    train = dataclasses.replace(cfg.train, steps=recorded["steps"], warmup_steps=recorded["warmup_steps"])
    return dataclasses.replace(cfg, train=train)


def fit_to_budget(s, log, train_step, evaluate) -> None:
    """train.budget: set s.cfg.train.steps to what fits the budget, and scale train.warmup_steps by the same
    ratio so the schedule (warm-up, then decay to 0) ends where the budget does."""
    cfg = s.cfg
    seconds, tokens = parse_budget(cfg.train.budget)
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    if tokens is not None:
        steps = int(tokens // tokens_per_step)
        how = f"{tokens:,.0f} tokens at {tokens_per_step:,} tokens per step"
    else:
        started = time.perf_counter()
        step_s, eval_s, timed = time_first_steps(s, train_step, evaluate, min_seconds=min(5.0, 0.02 * seconds))
        remaining = seconds - (time.perf_counter() - started)
        evals_per_step = eval_s / cfg.eval.every if cfg.eval.every else 0.0
        # The evaluations at step 0 and at the last step come on top of one every eval.every steps.
        steps = int((remaining - 2 * eval_s) // (step_s + evals_per_step))
        how = (f"{remaining:,.0f}s left after timing {timed} steps at {step_s:.3g}s per step"
               + (f" and {eval_s:.3g}s per evaluation" if eval_s else ""))
    if steps < 1:
        raise UserError(f"train.budget={cfg.train.budget} does not fit one step ({how}): give a larger budget")
    warmup = round(cfg.train.warmup_steps * steps / cfg.train.steps)
    s.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, warmup_steps=warmup))
    log(f"budget {cfg.train.budget}: {how} → train.steps={steps:,}, train.warmup_steps={warmup:,}")


def time_first_steps(s, train_step, evaluate, min_seconds: float) -> tuple[float, float, int]:
    """(seconds per training step, seconds per evaluation, steps timed), measured on real steps that are
    then taken back: the model, the optimizer and the random streams are set back to where they were, so
    the run that follows is the one a fixed train.steps would give. The first step (compilation,
    allocation) is not counted; the slowest rank's figures count."""
    saved = s.engine.copy_state()
    rng = rng_state(s.device)
    times: list[float] = []
    started = time.perf_counter()
    for step in range(50):
        begin = time.perf_counter()
        loss, _, _ = train_step(s, step)
        loss.item()  # wait for the device
        times.append(time.perf_counter() - begin)
        if len(times) > 3 and time.perf_counter() - started >= min_seconds:
            break
    eval_s = 0.0
    if s.cfg.eval.every and s.validation is not None:
        begin = time.perf_counter()
        evaluate(s)
        eval_s = time.perf_counter() - begin
    s.engine.restore_state(saved)
    set_rng_state(rng, s.device)
    step_s = sorted(times[1:])[len(times[1:]) // 2]  # the median: robust to a slow outlier
    step_s, eval_s = dist.max_across_ranks([step_s, eval_s], s.info)
    return step_s, eval_s, len(times)
