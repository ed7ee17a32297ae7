"""The run's `checkpoints.md`: a human-readable index of its committed checkpoints.

The MLflow UI previews Markdown artifacts, and a run's Artifacts tab does not
list the files of its LoggedModels, so this page is where a person browsing
the run sees every checkpoint with its epoch, metrics and URI.
"""

INDEX_FILE = "checkpoints.md"


def _format_size(size_bytes) -> str:
    if size_bytes is None:
        return "?"
    size = float(size_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size_bytes} B"


def render_index(run_id: str, checkpoints, monitor: str | None = None) -> str:
    """Return the Markdown text of the index, newest checkpoint first."""
    metric_names = sorted({key for c in checkpoints for key in c.metrics})
    header = ["Epoch", "Step", "Status", "Format", "Size"] + metric_names + ["Model URI"]
    lines = [
        f"# Checkpoints of run {run_id}",
        "",
        f"{len(checkpoints)} committed checkpoint(s). Load one with "
        f"`mlflow_ckpt.load_checkpoint(\"{run_id}\", epoch=N)` or serve it with "
        "`mlflow models serve -m <Model URI>`.",
        "",
    ]
    if monitor:
        lines += [f"Best checkpoint by `{monitor}` is marked with *.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best_id = None
    if monitor:
        from mlflow_ckpt.policies import rank_by_metric, resolve_mode

        ranked = rank_by_metric(checkpoints, monitor, resolve_mode(monitor, "auto"))
        best_id = ranked[0].model_id if ranked else None
    for checkpoint in reversed(checkpoints):
        epoch = f"{checkpoint.epoch}{' *' if checkpoint.model_id == best_id else ''}"
        row = [
            epoch,
            str(checkpoint.global_step),
            checkpoint.status,
            checkpoint.format,
            _format_size(checkpoint.size_bytes),
        ]
        row += [
            f"{checkpoint.metrics[name]:.6g}" if name in checkpoint.metrics else ""
            for name in metric_names
        ]
        row.append(f"`{checkpoint.model_uri}`")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_index(client, run_id: str, checkpoints, monitor: str | None = None) -> None:
    """Log the index as the run artifact `checkpoints.md`, replacing the previous one."""
    client.log_text(run_id, render_index(run_id, checkpoints, monitor), INDEX_FILE)
