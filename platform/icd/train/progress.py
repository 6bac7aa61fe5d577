"""What a training job prints for a person: one line per ``log_every`` steps, no per-block bars.

    icd  step 45/120  loss 0.0841  7.62 samples/s  elapsed 3m12s  ETA 5m20s

The numbers go to MLflow as metrics too; this is the job log's view of them.
"""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``3h05m``, ``4m07s`` or ``12s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def eta_s(step: int, steps: int, timed_steps: int, timed_s: float) -> float | None:
    """Seconds left at the pace of the ``timed_steps`` steps that took ``timed_s``; None before any."""
    if timed_steps <= 0 or timed_s <= 0:
        return None
    return (steps - step) * timed_s / timed_steps


def progress_line(stage: str, step: int, steps: int, loss: float, samples_per_s: float, elapsed_s: float,
                  eta: float | None) -> str:
    width = len(str(steps))
    return (f"{stage}  step {step:>{width}}/{steps}  loss {loss:.4g}  {samples_per_s:.2f} samples/s  "
            f"elapsed {format_duration(elapsed_s)}  ETA {format_duration(eta) if eta is not None else '?'}")


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress (a line per block in a job log) off in this driver.

    For training jobs, whose log should show the training's progress. A dataset takes the
    driver's DataContext when it is created, so call this before building datasets. Interactive
    data jobs (jobs/make_shards.py, jobs/encode_latents.py) keep the bars.
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
