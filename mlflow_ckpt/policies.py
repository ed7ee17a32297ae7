"""Save and retention policies: small objects that each make one decision.

A save policy decides whether a step or epoch is a save point. A retention
policy returns the checkpoints that its rule keeps. Retention rules combine by union:
a checkpoint survives if any rule keeps it, and the newest and the best are
always kept. A new rule is a new class, not a new flag on the callback.
"""

import math

import numpy as np


def resolve_mode(monitor: str, mode: str) -> str:
    """Turn Keras' `mode="auto"` into `"min"` or `"max"` from the metric name."""
    if mode in ("min", "max"):
        return mode
    name = monitor.lower()
    if "acc" in name or name.startswith("fmeasure") or "auc" in name or "precision" in name or "recall" in name:
        return "max"
    return "min"


def is_improvement(value: float, best: float | None, mode: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def metric_value(logs: dict, monitor: str):
    """Return `logs[monitor]` as a float, or None when the metric is absent."""
    if not logs or monitor not in logs:
        return None
    return float(np.asarray(logs[monitor]))


class EveryNEpochs:
    """Save at the end of every `n`-th epoch (1-based: epochs n, 2n, ...)."""

    def __init__(self, n: int):
        self.n = n

    def should_save_epoch(self, epoch: int) -> bool:
        return epoch % self.n == 0


class EveryNSteps:
    """Save when the global step reaches or passes a multiple of `n`."""

    def __init__(self, n: int):
        self.n = n

    def crossed(self, previous_step: int, global_step: int) -> bool:
        """Return True if a multiple of `n` lies in `(previous_step, global_step]`."""
        return global_step // self.n > previous_step // self.n


class BestOnly:
    """Let a save through only if `monitor` improved on the best value seen so far.

    `best` starts at `initial_value_threshold`, as in `keras.callbacks.ModelCheckpoint`.
    """

    def __init__(self, monitor: str, mode: str, initial_value_threshold: float | None = None):
        self.monitor = monitor
        self.mode = mode
        self.best = initial_value_threshold

    def improves(self, logs: dict) -> bool:
        return is_improvement(metric_value(logs, self.monitor), self.best, self.mode)

    def record(self, logs: dict) -> None:
        value = metric_value(logs, self.monitor)
        if is_improvement(value, self.best, self.mode):
            self.best = value


# Retention rules. Each takes committed checkpoints ordered by (epoch, step)
# and returns the model ids it keeps.


class KeepLast:
    """Keep the `n` newest checkpoints."""

    def __init__(self, n: int):
        self.n = n

    def keep(self, checkpoints) -> set:
        return {c.model_id for c in checkpoints[-self.n:]} if self.n > 0 else set()


class KeepBest:
    """Keep the `k` checkpoints with the best value of `monitor`."""

    def __init__(self, k: int, monitor: str, mode: str = "min"):
        self.k = k
        self.monitor = monitor
        self.mode = resolve_mode(monitor, mode)

    def keep(self, checkpoints) -> set:
        return {c.model_id for c in rank_by_metric(checkpoints, self.monitor, self.mode)[: self.k]}


class KeepEvery:
    """Keep every checkpoint whose epoch is a multiple of `m`."""

    def __init__(self, m: int):
        self.m = m

    def keep(self, checkpoints) -> set:
        return {c.model_id for c in checkpoints if c.epoch % self.m == 0}


def rank_by_metric(checkpoints, monitor: str, mode: str) -> list:
    """Order the checkpoints that have `monitor`, best first; ties go to the newer one."""
    scored = [c for c in checkpoints if monitor in c.metrics and not math.isnan(c.metrics[monitor])]
    sign = 1.0 if mode == "min" else -1.0
    return sorted(scored, key=lambda c: (sign * c.metrics[monitor], -c.epoch, -c.global_step))


def checkpoints_to_delete(checkpoints, rules, monitor: str | None = None, mode: str = "min") -> list:
    """Return the committed checkpoints that no rule keeps.

    The newest checkpoint and, when `monitor` is given, the best one are
    always kept, so a resume or a promote always has a target.
    """
    if not rules or not checkpoints:
        return []
    ordered = sorted(checkpoints, key=lambda c: (c.epoch, c.global_step))
    kept = {ordered[-1].model_id}
    if monitor:
        ranked = rank_by_metric(ordered, monitor, resolve_mode(monitor, mode))
        if ranked:
            kept.add(ranked[0].model_id)
    for rule in rules:
        kept |= rule.keep(ordered)
    return [c for c in ordered if c.model_id not in kept]
