"""The library behind the jobs (`pipelines/`), the Ray stages (`actors/`) and serving (`serve/`):
everything that is not orchestration. Its subpackages, lowest first; each may import only those
listed before it, and `search` and `train` share a level (neither imports the other);
tests/unit/test_layout.py checks the directions and that there is no circle:

- `errors`, `log` (modules): the user-error types and the logger; every subpackage may use them.
- `storage`: files on any filesystem (local, s3://, gs://), Parquet, atomic writes, the cache of
  remote files, and the output layout's path names.
- `method`: the paper's method as pure functions over arrays and strings: the keyword rewrite and
  the LLM prompts, relevance x aesthetic ranking, the u x v preference grid, the losses.
- `config`: the typed configuration (one module per group of sections) and its reference docs.
- `models`: CLIP models (open_clip, the project's tiny configs) and the aesthetic scorers.
- `runtime`: what every job runs on: joining Ray, torch threads, Ray Data stage helpers, the job
  manifest and progress metrics, resumption, the command line.
- `data`: the data contracts and what reads or makes them: image decoding, tar and Parquet
  sources, query files, the synthetic world.
- `search`: FAISS index sizing and training, the sharded build, searching a sharded corpus, the
  index folder's files and checks.
- `train`: the training step, the trainer (DeepSpeed or DDP, checkpoints, export), the aesthetic
  scorer's training loop, pair checks and preference tables.
- `evaluation`: the evaluate job's metrics, systems, gallery, HPIR, judge and report.
"""
