"""`--record-views`: what the coordinator received from each hospital, saved for research.

Next to the plaintext delta each simulated hospital saves (client/secure_views.py), the
coordinator saves the exact payload bytes it received from that hospital and an index that
pairs them, so anyone can measure what a coordinator could learn from its view.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.core.adapters import Adapter

INDEX = "index.json"


class ViewRecorder:
    """Writes received payloads under <root>/round-NNNN/ and keeps <root>/index.json."""

    def __init__(self, root: Path, reference: Adapter, mode: str) -> None:
        self.root = root
        self.mode = mode  # "secure-aggregation" (uint32, masked) or "plain" (float32 delta)
        self.index: dict[str, Any] = {
            "format": "fedtune-views-1",
            "mode": mode,
            "layout": [
                {"name": name, "shape": list(reference[name].shape)} for name in sorted(reference)
            ],
            "notes": (
                "plaintext: float32 delta as the hospital computed it (before clipping), "
                "tensors flattened in layout order (np.load). received: in "
                "secure-aggregation mode the exact bytes of the masked array as carried on "
                "the wire (Flower serializes arrays in .npy format: np.load(io.BytesIO(...)) "
                "gives uint32 values, the last one the masked weight); in plain mode the "
                "received float32 delta values, flattened in layout order, in .npy format."
            ),
            "rounds": {},
        }
        root.mkdir(parents=True, exist_ok=True)

    def received(self, server_round: int, hospital: str, payload: bytes, dtype: str) -> None:
        folder = self.root / f"round-{server_round:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{hospital}.received.bin").write_bytes(payload)
        self.index["rounds"].setdefault(str(server_round), {})[hospital] = {
            "plaintext": f"round-{server_round:04d}/{hospital}.plaintext.npy",
            "received": f"round-{server_round:04d}/{hospital}.received.bin",
            "received_dtype": dtype,
            "received_bytes": len(payload),
        }
        self._save()

    def _save(self) -> None:
        path = self.root / INDEX
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.index, indent=2), encoding="utf-8")
        tmp.replace(path)
