"""The coordinator's Flower ServerApp.

Reads the run configuration named in the Flower run config (`config-path`), builds the
initial global adapter, and runs the round loop in `server.rounds` writing to `run-dir`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.core.config import ConfigError, load_run_config, resolve_paths
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.server.prompt_grid import PromptGrid
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a whole federated fine-tuning run."""
    config_path = str(context.run_config.get("config-path", ""))
    run_dir_path = str(context.run_config.get("run-dir", ""))
    if not config_path or not run_dir_path:
        raise ConfigError(
            "The Flower run config must set config-path (the fedtune TOML) and run-dir "
            "(where checkpoints go); `fedtune run --config ...` sets both."
        )
    config = resolve_paths(load_run_config(Path(config_path)), Path(config_path).parent)
    run_dir = RunDirectory(Path(run_dir_path))
    resume = bool(context.run_config.get("resume", False))
    if resume:
        started = run_dir.config()
        if started != config:
            before, now = started.to_dict(), config.to_dict()
            changed = sorted(
                f"{section}.{key}"
                for section in now
                for key in now[section]
                if before[section].get(key) != now[section][key]
            )
            raise ConfigError(
                f"{run_dir.path} was started with a different run configuration (changed: "
                f"{', '.join(changed)}); resume it with the same --config and flags, or "
                "start a new run directory."
            )
    else:
        run_dir.create(config)
    print(f"fedtune: run directory {run_dir.path}", flush=True)
    initial = initial_global_adapter(config)
    # Replies are collected as they arrive, not every 3 s, and each is read only up to
    # federation.max_reply_mb (server/prompt_grid.py).
    limit = int(config.federation.max_reply_mb * 1024**2)
    run_federation(PromptGrid(grid, max_reply_bytes=limit), config, run_dir, initial, say=_say,
                   resume=resume)


def _say(line: str) -> None:
    print(line, flush=True)
