"""The run's `checkpoints.md`: a human-readable index of its committed checkpoints.

The MLflow UI previews Markdown artifacts, and a run's Artifacts tab does not
list the files of its LoggedModels, so this page lists every checkpoint with
its epoch, metrics and URI for a person browsing the run. The table
helpers here are shared with `mlflow-ckpt list`, so both show the same values.
"""

INDEX_FILE = "checkpoints.md"

_SIZE_UNITS = ("B", "KB", "MB", "GB", "TB")


def format_size(size_bytes) -> str:
    """Format a byte count with binary prefixes (1 KB = 1024 B), or `"?"` if unknown."""
    if size_bytes is None:
        return "?"
    size = float(size_bytes)
    for unit in _SIZE_UNITS:
        if size < 1024 or unit == _SIZE_UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size_bytes} B"


def format_metric(value) -> str:
    """Format a metric value with 6 significant digits."""
    return f"{value:.6g}"


def metric_names(checkpoints) -> list[str]:
    """Return the names of every metric linked to any of `checkpoints`, sorted."""
    return sorted({name for checkpoint in checkpoints for name in checkpoint.metrics})


def epoch_label(checkpoint) -> str:
    """Return the epoch of `checkpoint`, with the steps taken into the next epoch if it is mid-epoch.

    A checkpoint made 40 steps into epoch 3 reads `2 +40 steps`: two epochs
    completed, then 40 steps.
    """
    if checkpoint.steps_into_epoch:
        return f"{checkpoint.epoch} +{checkpoint.steps_into_epoch} steps"
    return str(checkpoint.epoch)


def checkpoint_cells(checkpoint, names) -> list[str]:
    """Return a checkpoint's table cells: epoch, step, status, format, size, then `names`."""
    cells = [
        epoch_label(checkpoint),
        str(checkpoint.global_step),
        checkpoint.status,
        checkpoint.format,
        format_size(checkpoint.size_bytes),
    ]
    cells += [
        format_metric(checkpoint.metrics[name]) if name in checkpoint.metrics else ""
        for name in names
    ]
    return cells


def best_model_id(checkpoints, monitor: str | None, mode: str = "auto") -> str | None:
    """Return the model id of the best checkpoint by `monitor`, or None."""
    if not monitor:
        return None
    from mlflow_ckpt.policies import rank_by_metric, resolve_mode

    ranked = rank_by_metric(checkpoints, monitor, resolve_mode(monitor, mode))
    return ranked[0].model_id if ranked else None


def render_index(run_id: str, checkpoints, monitor: str | None = None) -> str:
    """Return the Markdown text of the index, newest checkpoint first."""
    names = metric_names(checkpoints)
    header = ["Epoch", "Step", "Status", "Format", "Size", *names]
    best_id = best_model_id(checkpoints, monitor)

    lines = [
        f"# Checkpoints of run {run_id}",
        "",
        f"{len(checkpoints)} committed checkpoint(s), newest first. Each one is also listed "
        "under \"Logged models\" on the run's Overview tab, as `checkpoint-epoch-NNNN`, where "
        "it can be registered.",
        "",
    ]
    if best_id:
        lines += [f"The best checkpoint by `{monitor}` is marked with *.", ""]
    if any(checkpoint.steps_into_epoch for checkpoint in checkpoints):
        lines += [
            "An epoch shown as `2 +40 steps` is a mid-epoch checkpoint: two epochs completed, "
            "then 40 steps of the third.",
            "",
        ]

    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for checkpoint in reversed(checkpoints):
        cells = checkpoint_cells(checkpoint, names)
        if checkpoint.model_id == best_id:
            cells[0] += " *"
        lines.append("| " + " | ".join(cells) + " |")

    # The URIs are listed apart from the table because they would make it too wide to read.
    lines += ["", "## Model URIs", ""]
    lines += [f"- epoch {c.epoch}: `{c.model_uri}`" for c in reversed(checkpoints)]

    lines += [
        "",
        "## Use a checkpoint",
        "",
        f"- Load: `mlflow_ckpt.load_checkpoint(\"{run_id}\", epoch=N)`",
        f"- Resume training: `mlflow_ckpt.resume(\"{run_id}\", epoch=N)`",
        "- Serve: `mlflow models serve -m <Model URI> --env-manager local`",
        f"- Register: `mlflow-ckpt promote {run_id} --epoch N --name <registered model name>`",
        f"- Verify every file: `mlflow-ckpt verify {run_id}`",
    ]
    return "\n".join(lines) + "\n"


def write_index(client, run_id: str, checkpoints, monitor: str | None = None) -> None:
    """Log the index as the run artifact `checkpoints.md`, replacing the previous one."""
    client.log_text(run_id, render_index(run_id, checkpoints, monitor), INDEX_FILE)
