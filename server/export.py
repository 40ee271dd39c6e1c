"""Export a run's global adapter as a standard PEFT adapter directory.

The result loads with plain `PeftModel.from_pretrained(base, dir)` — no fedtune needed —
and optionally a merged model (LoRA folded into the base weights) for serving stacks that do
not speak PEFT.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fedtune.core.adapters import adapter_sha256
from fedtune.core.lineage import model_sha256
from fedtune.core.model import attach_adapter, load_base_model, set_adapter
from fedtune.core.model_source import model_cache_root, resolve_model_source
from fedtune.server.audit_trail import CoordinatorAudit
from fedtune.server.model_card import model_card, write_model_card
from fedtune.server.run_dir import RunDirectory
from fedtune.server.versions import best_round


class ExportError(ValueError):
    """The requested round or run cannot be exported."""


def choose_round(run_dir: RunDirectory, which: str) -> int:
    """`final` (last saved), `best` (best weighted validation metric) or a round number."""
    saved = run_dir.saved_rounds()
    if not saved:
        raise ExportError(f"{run_dir.path} has no saved adapters")
    if which == "final":
        return saved[-1]
    if which == "best":
        best = best_round(run_dir)
        if best is None:
            raise ExportError(
                f"{run_dir.path} has no validated rounds to choose the best from; "
                "use --round final or a round number"
            )
        return best
    try:
        number = int(which)
    except ValueError:
        raise ExportError(f"round must be 'final', 'best' or a number, got {which!r}") from None
    if number not in saved:
        raise ExportError(f"round {number} was not saved; saved rounds: {saved}")
    return number


def export_adapter(
    run_dir: RunDirectory, out_dir: Path, which: str, merged: bool, pseudonymize: bool = False
) -> int:
    """Write the chosen round's adapter (and tokenizer) and its model card to `out_dir`;
    return the round. `pseudonymize` shows hospitals as per-run pseudonyms on the card."""
    config = run_dir.config()
    server_round = choose_round(run_dir, which)
    settings = dataclasses.replace(config.model, device="cpu", load_in_4bit=False)
    base, tokenizer, fresh = load_base_model(settings, config.model.labels, torch.device("cpu"))
    if merged and config.adapter.is_prompt_learning:
        raise ExportError(
            f"--merged is not possible for adapter.method = {config.adapter.method!r}: its "
            "virtual tokens are an input to the model, not weights that can be merged into "
            "it. Export without --merged and load it with PeftModel.from_pretrained."
        )
    model = attach_adapter(base, config.adapter, config.lora, config.model.task, fresh)
    set_adapter(model, run_dir.load_adapter(server_round))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    source_dir, gguf_file = resolve_model_source(config.model)
    (out_dir / "fedtune-export.json").write_text(
        json.dumps(
            {
                "run_dir": str(run_dir.path.resolve()),
                "round": server_round,
                "task": config.model.task,
                "adapter_method": config.adapter.method,
                "base_model": config.model.source,
                "base_model_dir": str(source_dir),
                "gguf_file": gguf_file,
                "labels": list(config.model.labels),
                "pooling": config.model.pooling,  # "mean": the base's pooler is not used
                "max_length": config.model.max_length,  # tokens, as in training
            },
            indent=2,
        )
    )
    base_sha = model_sha256(source_dir, model_cache_root())
    write_model_card(out_dir, model_card(run_dir, server_round, base_sha, pseudonymize))
    CoordinatorAudit(run_dir).event("export", {
        "round": server_round, "out_dir": str(out_dir.resolve()), "merged": merged,
        "adapter_sha256": adapter_sha256(run_dir.load_adapter(server_round)),
        "base_model_sha256": base_sha, "pseudonymized": pseudonymize,
    })
    if merged:
        merged_model = model.merge_and_unload()
        merged_model.save_pretrained(str(out_dir / "merged"))
        tokenizer.save_pretrained(str(out_dir / "merged"))
    return server_round
