"""The `mlflow-ckpt` command line."""

import logging
import sys

import click

from mlflow_ckpt._version import __version__


class UserError(click.ClickException):
    """An error caused by the user's input: printed as one line, exit code 1."""


def _run_user_action(action):
    """Run `action`, turning mlflow-ckpt and MLflow errors into one-line CLI errors."""
    from mlflow.exceptions import MlflowException

    try:
        return action()
    except (MlflowException, ValueError, FileNotFoundError) as error:
        message = getattr(error, "message", None) or str(error)
        raise UserError(" ".join(message.split())) from error


@click.group()
@click.version_option(__version__, prog_name="mlflow-ckpt")
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="MLflow tracking URI. Defaults to $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def cli(tracking_uri, verbose):
    """Manage Keras checkpoints logged to MLflow by mlflow-ckpt."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)


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

    result = _run_user_action(
        lambda: train_job(
            epochs=epochs,
            every_n_epochs=every_n_epochs,
            format=model_format,
            batch_size=batch_size,
            dataset=dataset,
            data_path=data_path,
            seed=seed,
        )
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

    result = _run_user_action(
        lambda: resume_training(
            run_id, epoch=epoch or None, epochs=epochs or None, data_path=data_path
        )
    )
    click.echo(f"\nRun {result.run_id}")
    click.echo(result.table())


def main():
    cli(prog_name="mlflow-ckpt")


if __name__ == "__main__":
    sys.exit(main())
