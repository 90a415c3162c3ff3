"""Getting files onto this machine, resumably and verified: the downloader (`download.py`), CLIP_benchmark
datasets from a mirror (`benchmarks.py`), published URL lists (`url_lists.py`), model weights (`weights.py`)."""
