"""Training: the step's losses and optimiser (`steps`), the trainer that runs them under DeepSpeed or
DDP with checkpoints and export (`trainer`), the learned aesthetic scorer's loop (`scorer`), pair
checks (`pair_checks`) and the preference tables behind the pairs (`preference_tables`). May import
`storage`, `method`, `config`, `models`, `runtime`, `data`.
"""
