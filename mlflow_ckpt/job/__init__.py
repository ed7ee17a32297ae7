"""The packaged training job that `mlflow run .` runs: a digits classifier with checkpoints."""
