"""The `mlflow-ckpt` command line.

Results go to stdout and progress lines to stderr. A user error (an unknown
run, a missing epoch, an invalid option, an unreachable tracking server)
exits with a non-zero code and one line on stderr, never a traceback.
"""

import contextlib
import json
import logging
import os
import sys

import click

from mlflow_ckpt._version import __version__

# MLflow 3.17's REST client retries a failed request 7 times with exponential
# back-off and waits 120 s for a response, so a command aimed at a stopped
# server would hang for minutes. The commands below use these limits instead,
# unless the user set the variables. `train` and `resume` keep MLflow's
# defaults, because a long training job should outlast a short outage.
_FAIL_FAST_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_FAIL_FAST_COMMANDS = {"list", "show", "verify", "promote", "prune", "upload"}

# Download progress prints one line per file of at least this size, and one
# for the last file, so large checkpoints show movement and small ones stay quiet.
_PROGRESS_MIN_FILE_BYTES = 1 << 20


class UserError(click.ClickException):
    """An error caused by the user's input or setup: printed as one line, exit code 1."""


class _OneLineErrorGroup(click.Group):
    """A click group that reports every error as one line on stderr.

    For an invalid option, click prints a usage block of three or four
    lines. This group prints the message and where to find help on one line.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx else (prog_name or "mlflow-ckpt")
            click.echo(f"Error: {error.format_message()} (see '{command} --help')", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            click.echo(f"Error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def _one_line(error: BaseException) -> str:
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return " ".join(str(message).split())


@contextlib.contextmanager
def _user_errors():
    """Turn mlflow-ckpt, MLflow and file errors raised inside the block into one-line CLI errors."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, ValueError, OSError) as error:
        message = _one_line(error)
        from mlflow_ckpt.store import unreachable_reason

        reason = unreachable_reason(message) if isinstance(error, MlflowException) else None
        if reason:
            import mlflow

            message = (
                f"Cannot reach the MLflow tracking server at {mlflow.get_tracking_uri()} "
                f"({reason}). Start the server, or point --tracking-uri or "
                "MLFLOW_TRACKING_URI at a running one."
            )
        raise UserError(message) from error


def _print_file_progress(progress) -> None:
    from mlflow_ckpt.run_index import format_size

    last = progress.done_files == progress.total_files
    if progress.size_bytes < _PROGRESS_MIN_FILE_BYTES and not last:
        return
    click.echo(
        f"mlflow-ckpt: epoch {progress.checkpoint.epoch}: downloaded "
        f"{progress.done_files}/{progress.total_files} files, "
        f"{format_size(progress.done_bytes)} of {format_size(progress.total_bytes)} "
        f"({progress.path})",
        err=True,
    )


def _print_table(header, rows) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _is_run_id(ref: str) -> bool:
    from mlflow_ckpt import store

    return not (ref.startswith("models:/") or os.path.sep in ref or store.is_local_checkpoint_dir(ref))


@click.group(cls=_OneLineErrorGroup)
@click.version_option(__version__, prog_name="mlflow-ckpt")
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="MLflow tracking URI. Defaults to $MLFLOW_TRACKING_URI, else MLflow's default "
    "(sqlite:///mlflow.db in the current folder).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
@click.pass_context
def cli(ctx, tracking_uri, verbose):
    """Manage Keras checkpoints logged to MLflow by mlflow-ckpt.

    A REF is a run id (its latest committed checkpoint, or the one chosen
    with --epoch), a models:/<model_id> URI, or a local checkpoint folder.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # urllib3 logs each HTTP retry as a warning, which the one-line error already covers.
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    if ctx.invoked_subcommand in _FAIL_FAST_COMMANDS:
        for name, value in _FAIL_FAST_HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)


@cli.command("list")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of checkpoints, oldest first.")
@click.option("--committed-only", is_flag=True, help="Leave out checkpoints that are PENDING or FAILED.")
def list_command(run_id, as_json, committed_only):
    """List the checkpoints of run RUN_ID, oldest epoch first.

    The table shows each checkpoint's epoch, global step, status, format,
    size, the metrics of its epoch and its model URI. The best checkpoint by
    the metric the training monitored is marked with *.
    """
    from mlflow_ckpt import store
    from mlflow_ckpt.checkpoint import RUN_TAG_BEST
    from mlflow_ckpt.run_index import checkpoint_cells, metric_names

    with _user_errors():
        checkpoints = store.list_checkpoints(run_id, include_pending=not committed_only)
        best_id = store.get_run(run_id).data.tags.get(RUN_TAG_BEST)

    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checkpoints], indent=2))
        return
    if not checkpoints:
        click.echo(f"Run {run_id} has no checkpoints.")
        return
    names = metric_names(checkpoints)
    header = ["EPOCH", "STEP", "STATUS", "FORMAT", "SIZE", *names, "MODEL URI"]
    rows = []
    for checkpoint in checkpoints:
        cells = checkpoint_cells(checkpoint, names)
        if checkpoint.model_id == best_id:
            cells[0] += " *"
        rows.append([*cells, checkpoint.model_uri])
    _print_table(header, rows)
    if best_id and any(c.model_id == best_id for c in checkpoints):
        click.echo("* best checkpoint by the metric the training monitored")


@cli.command()
@click.argument("ref")
@click.option("--epoch", type=click.IntRange(min=0), default=None, help="With a run id: the epoch to show (default: the latest).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
@click.option("--uri", "uri_only", is_flag=True, help="Print only the model URI, for scripts.")
def show(ref, epoch, as_json, uri_only):
    """Show one checkpoint: its metrics, URI, manifest, signature and lineage."""
    from mlflow_ckpt import store
    from mlflow_ckpt.describe import describe_checkpoint

    with _user_errors():
        checkpoint = store.resolve(ref, epoch=epoch)
        if uri_only:
            click.echo(checkpoint.model_uri)
            return
        description = describe_checkpoint(checkpoint)

    if as_json:
        click.echo(json.dumps(description, indent=2))
        return
    _print_description(description)


def _print_description(description: dict) -> None:
    from mlflow_ckpt.run_index import format_metric, format_size

    record = description["checkpoint"]
    lineage = description["lineage"]
    content = description["manifest"] or {}

    click.echo(f"Checkpoint {record['model_uri']}")
    fields = [
        ("epoch", record["epoch"]),
        ("global step", record["global_step"]),
        ("status", record["status"]),
        ("format", record["format"]),
        ("size", format_size(record["size_bytes"])),
        ("created", content.get("created", "?")),
    ]
    for label, value in fields:
        click.echo(f"  {label:<12} {value}")

    click.echo("Metrics")
    width = max((len(name) for name in record["metrics"]), default=0)
    for name, value in sorted(record["metrics"].items()):
        click.echo(f"  {name:<{width}}  {format_metric(value)}")
    if not record["metrics"]:
        click.echo("  (none linked)")

    click.echo("Lineage")
    if lineage["run_id"] is None:
        click.echo(f"  local folder {record['local_path']} (not logged to MLflow)")
    else:
        click.echo(
            f"  run          {lineage['run_id']} ({lineage['run_name']}, experiment "
            f"{lineage['experiment_id']}, {lineage['run_status']})"
        )
        roles = [role for role, flag in (("latest", lineage["is_latest"]), ("best", lineage["is_best"])) if flag]
        if roles:
            click.echo(f"  role         {' and '.join(roles)} checkpoint of the run")
        if lineage["resumed_from_run"]:
            click.echo(
                f"  resumed from run {lineage['resumed_from_run']} at epoch "
                f"{lineage['resumed_from_epoch']}"
            )
        for version in lineage["registered_versions"]:
            click.echo(f"  registered   {version['model_uri']}")

    signature = description["signature"]
    if signature:
        click.echo("Signature")
        for key in ("inputs", "outputs"):
            for spec in signature.get(key) or []:
                click.echo(f"  {key[:-1]:<7} {_describe_spec(spec)}")

    click.echo("Manifest")
    if not content:
        click.echo("  manifest.json is missing")
        return
    versions = content.get("versions") or {}
    click.echo("  written by   " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    fingerprint = content.get("fingerprint")
    if isinstance(fingerprint, dict) and fingerprint.get("sha256"):
        click.echo(f"  architecture {fingerprint['sha256'][:16]}")
    files = content.get("files") or {}
    width = max((len(path) for path in files), default=0)
    for path, entry in sorted(files.items()):
        click.echo(f"  {path:<{width}}  {format_size(entry['size']):>9}  sha256 {entry['sha256'][:16]}")


def _describe_spec(spec: dict) -> str:
    name = spec.get("name") or "(unnamed)"
    if spec.get("type") == "tensor":
        tensor = spec.get("tensor-spec") or {}
        return f"{name}: {tensor.get('dtype')} {tuple(tensor.get('shape') or ())}"
    return f"{name}: {spec.get('type')}"


@cli.command()
@click.argument("ref")
@click.option("--epoch", type=click.IntRange(min=0), default=None, help="With a run id: verify only this epoch.")
def verify(ref, epoch):
    """Check every file of a checkpoint against its manifest (size and SHA-256).

    REF is a run id (every committed checkpoint of the run, or --epoch), a
    models:/<model_id> URI or a local checkpoint folder. Exits with code 1
    if any file is missing or corrupt.
    """
    from mlflow_ckpt import store, transfer

    with _user_errors():
        if _is_run_id(ref) and epoch is None:
            checkpoints = store.list_checkpoints(ref)
            if not checkpoints:
                raise UserError(f"Run {ref} has no committed checkpoint to verify.")
        else:
            checkpoints = [store.resolve(ref, epoch=epoch)]

        failed = []
        for checkpoint in checkpoints:
            problems = transfer.verify(
                checkpoint, on_file=_print_file_progress,
                on_bytes=transfer.ProgressPrinter(f"epoch {checkpoint.epoch}", "received"),
            )
            label = f"epoch {checkpoint.epoch}  {checkpoint.model_uri}"
            if problems:
                failed.append(checkpoint)
                click.echo(f"{label}  FAILED")
                for problem in problems:
                    click.echo(f"    {problem}")
            else:
                click.echo(f"{label}  OK")

    if failed:
        epochs = ", ".join(str(c.epoch) for c in failed)
        if any(c.local_path for c in failed):
            advice = "Use an intact copy of the folder, or load the checkpoint from its MLflow run."
        else:
            advice = (
                "Load another epoch, or resume with fallback=True to skip the bad ones. "
                "mlflow_ckpt.delete_checkpoint() removes a bad checkpoint from its run."
            )
        raise UserError(
            f"{len(failed)} of {len(checkpoints)} checkpoint(s) failed verification "
            f"(epoch {epochs}). {advice}"
        )
    click.echo(f"All {len(checkpoints)} checkpoint(s) match their manifests.")


@cli.command()
@click.argument("ref")
@click.option("--name", required=True, help="Registered model name; created if it does not exist.")
@click.option("--epoch", type=click.IntRange(min=0), default=None, help="With a run id: the epoch to promote (default: the latest).")
@click.option(
    "--format",
    "model_format",
    type=click.Choice(["keras", "h5", "savedmodel"]),
    default=None,
    help="Convert the model to this format (default: keep the checkpoint's format).",
)
@click.option("--alias", default=None, help="Registered model alias to point at the new version, e.g. champion.")
def promote(ref, name, epoch, model_format, alias):
    """Register a checkpoint as a new version of registered model NAME."""
    from mlflow_ckpt import store, transfer
    from mlflow_ckpt.promote import promote as promote_checkpoint

    with _user_errors():
        checkpoint = store.resolve(ref, epoch=epoch)
        version = promote_checkpoint(
            checkpoint, name, format=model_format, alias=alias, on_file=_print_file_progress,
            on_bytes=transfer.ProgressPrinter(f"epoch {checkpoint.epoch}", "received"),
        )
    click.echo(
        f"Registered {name} version {version.version} from epoch {checkpoint.epoch} of run "
        f"{checkpoint.run_id} ({checkpoint.model_uri}), format {model_format or checkpoint.format}."
    )
    click.echo(f"Model URI: models:/{name}/{version.version}")
    if alias:
        click.echo(f"Alias:     models:/{name}@{alias}")


@cli.command()
@click.argument("run_id")
@click.option("--keep-last", type=click.IntRange(min=1), default=None, help="Keep the N newest checkpoints.")
@click.option("--keep-best", type=click.IntRange(min=1), default=None, help="Keep the K best checkpoints by --monitor.")
@click.option("--keep-every", type=click.IntRange(min=1), default=None, help="Keep checkpoints whose epoch is a multiple of M.")
@click.option("--monitor", default="val_loss", show_default=True, help="Metric that ranks checkpoints for --keep-best and the best one.")
@click.option("--mode", type=click.Choice(["auto", "min", "max"]), default="auto", show_default=True, help="Whether a lower or higher --monitor is better; auto decides from the name.")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted and delete nothing.")
@click.option("--force", is_flag=True, help="Prune a run that is still RUNNING (only if its training process is gone).")
def prune(run_id, keep_last, keep_best, keep_every, monitor, mode, dry_run, force):
    """Delete the checkpoints of a finished run that no --keep-* rule keeps.

    The rules combine: a checkpoint kept by any of them stays. The newest
    checkpoint and the best by --monitor always stay, and so does a checkpoint
    that a registered model version reads directly (one registered from the
    MLflow UI). Deleting removes the checkpoint's files from the artifact
    store as well as its record.
    """
    from mlflow_ckpt import policies, run_index, store
    from mlflow.tracking import MlflowClient

    rules = []
    if keep_last is not None:
        rules.append(policies.KeepLast(keep_last))
    if keep_best is not None:
        rules.append(policies.KeepBest(keep_best, monitor, mode))
    if keep_every is not None:
        rules.append(policies.KeepEvery(keep_every))
    if not rules:
        raise click.UsageError("Pass at least one of --keep-last, --keep-best or --keep-every.")

    with _user_errors():
        client = MlflowClient()
        run = store.get_run(run_id, client)
        if run.info.status == "RUNNING" and not force:
            raise UserError(
                f"Run {run_id} is still RUNNING, and its training process may be committing "
                "checkpoints. Prune it after it ends, or pass --force if that process is gone."
            )
        checkpoints = store.list_checkpoints(run_id)
        doomed = policies.checkpoints_to_delete(checkpoints, rules, monitor, policies.resolve_mode(monitor, mode))
        registered = _registered_checkpoints(client, run_id)
        for checkpoint in [c for c in doomed if c.model_id in registered]:
            click.echo(
                f"Keeping epoch {checkpoint.epoch}  {checkpoint.model_uri}: registered as "
                f"{', '.join(registered[checkpoint.model_id])}, which reads its files"
            )
        doomed = [c for c in doomed if c.model_id not in registered]
        doomed_ids = {c.model_id for c in doomed}
        kept = [c for c in checkpoints if c.model_id not in doomed_ids]

        verb = "Would delete" if dry_run else "Deleting"
        for checkpoint in doomed:
            click.echo(f"{verb} epoch {checkpoint.epoch}  {checkpoint.model_uri}")
            if not dry_run:
                store.delete_checkpoint(checkpoint, client)
        if not dry_run and doomed:
            run_index.write_index(client, run_id, kept, monitor=monitor)

    kept_epochs = ", ".join(str(c.epoch) for c in kept) or "none"
    if dry_run:
        click.echo(f"Dry run: {len(doomed)} of {len(checkpoints)} checkpoint(s) would be deleted; keeping epochs {kept_epochs}.")
    else:
        click.echo(f"Deleted {len(doomed)} of {len(checkpoints)} checkpoint(s); kept epochs {kept_epochs}.")


def _registered_checkpoints(client, run_id: str) -> dict:
    """Map the model id of each checkpoint registered directly (as from the UI) to its versions.

    Such a model version reads the checkpoint's files in place, so deleting
    the checkpoint would break it. `mlflow-ckpt promote` registers a copy instead.
    """
    registered = {}
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        model_id = version.model_id
        if not model_id and (version.source or "").startswith("models:/m-"):
            model_id = version.source[len("models:/"):]
        if model_id:
            registered.setdefault(model_id, []).append(f"models:/{version.name}/{version.version}")
    return registered


@cli.command()
@click.option("--run-id", default=None, help="Upload only this run's checkpoints (default: every run's).")
@click.option(
    "--staging-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Staging folder (default: $MLFLOW_CKPT_STAGING_DIR, else ~/.cache/mlflow-ckpt/staging).",
)
def upload(run_id, staging_dir):
    """Commit checkpoints and metrics left in the staging folder by a crash or an outage."""
    from mlflow_ckpt.run_index import format_size
    from mlflow_ckpt.snapshot import default_staging_dir, find_staged, folder_size, remove_abandoned
    from mlflow_ckpt.uploader import find_staged_metrics, upload_staged

    staging_dir = staging_dir or default_staging_dir()
    removed = remove_abandoned(staging_dir, run_id)
    if removed:
        click.echo(
            f"Deleted {len(removed)} incomplete checkpoint folder(s) left by processes killed "
            "while writing them.",
            err=True,
        )
    snapshots = find_staged(staging_dir, run_id)
    metric_batches = find_staged_metrics(staging_dir, run_id)
    if not snapshots and not metric_batches:
        click.echo(f"Nothing to upload in {staging_dir}.")
        return
    click.echo(
        f"mlflow-ckpt: uploading {len(snapshots)} checkpoint(s) "
        f"({format_size(sum(folder_size(s.model_dir) for s in snapshots))}) and the metrics of "
        f"{len(metric_batches)} epoch(s) without a checkpoint from {staging_dir}",
        err=True,
    )
    with _user_errors(), _progress_logging("mlflow_ckpt.uploader"):
        committed = upload_staged(staging_dir=staging_dir, run_id=run_id)
    for epoch, model_id in committed:
        click.echo(f"Committed epoch {epoch} as models:/{model_id}")
    click.echo(
        f"Uploaded {len(committed)} checkpoint(s) with their epochs' metrics, and the metrics "
        f"of {len(metric_batches)} epoch(s) without a checkpoint."
    )


@contextlib.contextmanager
def _progress_logging(logger_name: str):
    """Print the INFO logs of `logger_name` to stderr as progress lines inside the block."""
    logger = logging.getLogger(logger_name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mlflow-ckpt: %(message)s"))
    handler.setLevel(logging.INFO)
    previous_level, previous_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    # The root handler that `cli` sets up would print each line a second time.
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        logger.propagate = previous_propagate


@cli.command()
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Number of epochs to train.")
@click.option("--every-n-epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Log a checkpoint every N epochs.")
@click.option(
    "--format",
    "model_format",
    type=click.Choice(["keras", "h5", "savedmodel", "weights"]),
    default="keras",
    show_default=True,
    help="Checkpoint format.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Training batch size.")
@click.option("--dataset", type=click.Choice(["digits", "mnist"]), default="digits", show_default=True, help="Data set to train on.")
@click.option("--data-path", default=None, help="Path of mnist.npz for --dataset mnist (default: the Keras cache).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; training is deterministic for a given seed.")
def train(epochs, every_n_epochs, model_format, batch_size, dataset, data_path, seed):
    """Train the packaged digits classifier with checkpoints (MLproject entry point `main`)."""
    from mlflow_ckpt.job.train import train as train_job

    with _user_errors():
        result = train_job(
            epochs=epochs,
            every_n_epochs=every_n_epochs,
            format=model_format,
            batch_size=batch_size,
            dataset=dataset,
            data_path=data_path,
            seed=seed,
        )
    click.echo(f"\nRun {result.run_id}")
    click.echo(result.table())


@cli.command()
@click.argument("run_id")
@click.option("--epoch", type=click.IntRange(min=0), default=0, help="Checkpoint epoch to resume from; 0 or omitted: the latest.")
@click.option("--epochs", type=click.IntRange(min=0), default=0, help="Total epochs to reach; 0 or omitted: the run's `epochs` parameter.")
@click.option("--data-path", default=None, help="Path of mnist.npz if the run used --dataset mnist.")
def resume(run_id, epoch, epochs, data_path):
    """Continue a run of the packaged job from a checkpoint (MLproject entry point `resume`)."""
    from mlflow_ckpt.job.train import resume_training

    with _user_errors():
        result = resume_training(run_id, epoch=epoch or None, epochs=epochs or None, data_path=data_path)
    click.echo(f"\nRun {result.run_id}")
    click.echo(result.table())


def main():
    cli(prog_name="mlflow-ckpt")


if __name__ == "__main__":
    main()
