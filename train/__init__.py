"""Training entry points: `python -m train.pretrain` (the bundled dLLM), `python -m train.grpo` (policies)."""
