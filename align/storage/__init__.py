"""Files and where they go: `io` reads and writes any filesystem pyarrow knows (local paths, s3://,
gs://), atomically, and caches remote files by content; `paths` names the output layout the jobs
share. Imports nothing of align but `errors`.
"""
