"""fedtune: federated, privacy-preserving LoRA fine-tuning for hospitals.

Kept import-light on purpose: Flower imports the app's packages while validating
`server.app:app`, and the CLI's `--help` must answer without loading torch.
"""

__version__ = "0.1.0"
