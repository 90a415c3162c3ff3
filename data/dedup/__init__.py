"""The dedup stage: exact duplicates, benchmark decontamination and near-duplicate clusters
(`deduplicate.py`) on 64-bit perceptual hashes with a sub-quadratic Hamming search (`phash.py`)."""

from data.dedup.deduplicate import KEEP_FILE, OVERLAP_FILE, REPORT_FILE, dedup, load_successes

__all__ = ["KEEP_FILE", "OVERLAP_FILE", "REPORT_FILE", "dedup", "load_successes"]
