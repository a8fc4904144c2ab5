"""The data contracts (`contracts`: every table a job reads or writes) and what reads or makes
them: image decoding (`images`), tar and Parquet image sources (`sources`, `tars`), query files
(`queries`), tables read by image id (`tables`), build_preferences' output tables
(`preference_tables`), the one error-table writer (`error_rows`) and the synthetic world (`world`). May import
`storage`, `method`, `config`, `models`, `runtime`.
"""
