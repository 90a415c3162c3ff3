"""Prefect orchestration of the witclip pipeline: thin flows over `data/` and `clip/`."""
