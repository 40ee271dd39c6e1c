"""Optional experiment tracking at the coordinator: TensorBoard and MLflow, off by default.

Only what the coordinator already knows is logged (weighted validation metrics, the largest ε
reported so far, round timings), never anything per patient. Each writer needs its package
(`tensorboard`, `mlflow` or `mlflow-skinny`); asking for one that is not installed is a
configuration error that says what to install, not a silent no-op.
"""

from __future__ import annotations

from typing import Any

from fedtune.core.config import ConfigError, TrackingSettings


class ExperimentTracker:
    """Fans one round's numbers out to the writers the run configuration asks for."""

    def __init__(self, settings: TrackingSettings, run_id: str, config: dict[str, Any]) -> None:
        self._tensorboard: Any = None
        self._mlflow: Any = None
        if settings.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "tracking.tensorboard_dir is set but the tensorboard package is not "
                    "installed on the coordinator: pip install tensorboard (or clear the key)."
                ) from None
            self._tensorboard = SummaryWriter(log_dir=f"{settings.tensorboard_dir}/{run_id}")
        if settings.mlflow_tracking_uri:
            try:
                import mlflow
            except ImportError:
                raise ConfigError(
                    "tracking.mlflow_tracking_uri is set but mlflow is not installed on the "
                    "coordinator: pip install mlflow-skinny (or clear the key)."
                ) from None
            mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
            mlflow.set_experiment(settings.mlflow_experiment)
            mlflow.start_run(run_name=run_id)
            flat = {f"{section}.{key}": value for section, values in config.items()
                    for key, value in values.items()
                    if not isinstance(value, list | dict)}
            mlflow.log_params(flat)
            self._mlflow = mlflow

    def log_round(self, server_round: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            if self._tensorboard is not None:
                self._tensorboard.add_scalar(name, value, server_round)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()},
                                     step=server_round)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._mlflow is not None:
            self._mlflow.end_run()
