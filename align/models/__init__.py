"""Models: CLIP (`clip`: open_clip with the project's tiny configs, one builder for jobs, Ray actors
and Serve replicas) and the aesthetic scorers (`aesthetics`: pixel measures, the LAION head, the
learned CNN). May import `storage`, `method`, `config`.
"""
