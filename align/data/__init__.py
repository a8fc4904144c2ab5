"""The data contracts (`contracts`: every table a job reads or writes) and what reads or makes
them: image decoding (`images`), tar and Parquet image sources (`sources`, `tars`), query files
(`queries`), tables read by image id (`tables`) and the synthetic world (`world`). May import
`storage`, `config`, `runtime`.
"""
