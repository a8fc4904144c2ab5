"""What every job runs on: joining Ray and telling Ray's failures from a stage's (`session`),
torch threads that follow the CPUs a task gets (`threads`), Ray Data stage helpers (`stages`),
the job manifest that accounts for every row (`manifest`), progress metrics (`progress`),
resumption of units and runs (`resume`) and the command line (`cli`). May import `storage`,
`method`, `config`, `models`.
"""
