"""The shard stage and what reads its output: the shard format (`format.py`), the writer (`writer.py`),
the training loader (`loader.py`) and the caption tokenizer trained on the train split (`tokenizer.py`)."""

from data.shards.writer import (
    SHARDS_MANIFEST_FILE,
    SIZES_FILE,
    count_samples,
    shard_paths,
    write_shards,
)

__all__ = ["SHARDS_MANIFEST_FILE", "SIZES_FILE", "count_samples", "shard_paths", "write_shards"]
