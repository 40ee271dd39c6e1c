"""The secure-aggregation stages that do not train import nothing heavy.

A deployed node answers every message in a fresh `flwr-clientapp` process (Flower 1.41), so
a stage that imported torch, transformers, peft or Opacus would spend seconds on imports for
a message that only signs keys or relays shares. Here a fresh interpreter imports the real
ClientApp and answers the key and share stages of a real secure round (the coordinator's own
`collect_secure`, three simulated hospitals that stop after the share stage), then reports
which heavy modules it loaded: none may be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "opacus")

_PROBE = """
import json, sys
from pathlib import Path

import numpy as np

from fake_grid import InProcessGrid
from fedtune.core.config import parse_run_config
from fedtune.core.secagg.identity import ensure_simulation_identities
from fedtune.core.secagg.wire import KEYS, SHARES
from fedtune.core.wire import Job
from fedtune.server.collect import HospitalNames
from fedtune.server.secure_round import collect_secure

root = Path(sys.argv[1])
ensure_simulation_identities(root / "keys", 3)
config = parse_run_config({
    "model": {"source": str(root), "task": "classify", "labels": ["a", "b"]},
    "data": {"simulation_root": str(root)},
    "federation": {"min_hospitals": 3},
    "secure_aggregation": {"threshold": 2, "simulation_keys_dir": str(root / "keys")},
}, "light-probe")
grid = InProcessGrid(3, drop_after={node: SHARES for node in (1000, 1001, 1002)})
adapter = {"layer.lora_A.weight": np.zeros((2, 4), np.float32),
           "layer.lora_B.weight": np.zeros((4, 2), np.float32)}
out = collect_secure(grid, grid.node_ids, adapter, Job(1, config, "run-light"), HospitalNames())
print(json.dumps({
    "answered": [[r.metadata.message_type, r.has_error()] for r in grid.replies],
    "refusals": [r.reason for r in out.refusals],
    "abort": out.abort_reason,
    "heavy": sorted(m for m in HEAVY_MODULES if m in sys.modules),
}))
""".replace("HEAVY_MODULES", repr(HEAVY))


def test_key_and_share_stages_answer_without_importing_the_training_stack(tmp_path: Path):
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    answered = [tuple(x) for x in report["answered"]]
    # Every hospital answered both stages, none with an error...
    assert sorted(answered) == sorted([("train.secagg_keys", False)] * 3
                                      + [("train.secagg_shares", False)] * 3), report
    # ...the round then stopped because nobody answered the masked-input stage (no training)...
    assert report["abort"] and "masked" in report["abort"], report
    # ...and nothing of the training stack was imported to get there.
    assert report["heavy"] == [], report


def test_the_clientapp_module_graph_is_light(tmp_path: Path):
    """Importing the ClientApp (what Flower does first in every message's process) loads
    none of the heavy modules; the training handlers import them only when they run."""
    code = ("import sys, fedtune.client.app, fedtune.client.secure_stages; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
