"""Training: the step's losses and optimiser (`steps`), the trainer that runs them under DeepSpeed
or DDP with checkpoints and export (`trainer`), the learned aesthetic scorer's loop (`scorer`) and
the checks a fine-tune makes of its pairs and captions (`pair_checks`). May import `storage`,
`method`, `config`, `models`, `runtime`, `data`.
"""
