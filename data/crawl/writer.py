"""What the crawl writes per img2dataset shard, reproducibly: the same candidates fetched from the same
web give byte-identical NNNNN.tar, NNNNN.parquet and NNNNN_stats.json, whatever the thread timing.

img2dataset's own `WebDatasetSampleWriter` writes samples in the order its download threads finish
(`imap_unordered`) and stamps every tar member with the wall clock; its `write_stats` stores the
shard's start, end and duration and the status counts in first-seen order. Here:

- `OrderedWebDatasetWriter` (given to img2dataset's `Downloader` as `sample_writer_class`) writes the
  same files with the same contents -- per successful sample the members `<key>.jpg`, `<key>.txt` and
  `<key>.json` (img2dataset's metadata, indent 4); one parquet row per candidate with the shard's
  schema -- but samples and rows in key order (= candidate order) and every member with mtime 0,
  mode 0444, user and group "bigdata", uid and gid 0 (webdataset's defaults otherwise). Samples are
  spooled to `<output_folder>/_tmp` as they arrive and copied into place in order at `close()`, so
  memory holds one member at a time plus the metadata rows.
- `write_stats` replaces img2dataset's (same signature): count, successes, failed_to_download,
  failed_to_resize and status_dict (most frequent first, ties by name), without the wall-clock
  fields; the crawl's own counts carry its elapsed time. Written atomically, last: its presence still
  means the shard is finished.

Both need a local (or mounted shared) output folder: the crawl always passes one.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.common.files import atomic_path, atomic_write_json

SCRATCH_DIR = "_tmp"  # the crawl's scratch folder in its output folder, removed when the crawl ends
_MEMBER_USER = "bigdata"  # webdataset's TarWriter defaults, so only the order and mtime change
_MEMBER_MODE = 0o444

_Member = tuple[str, int, int]  # (member name, offset in the spool, size)


def _shard_stem(shard_id: int, oom_shard_count: int) -> str:
    """img2dataset's file stem for a shard: the id zero-padded to `oom_shard_count` digits."""
    return f"{shard_id:0{oom_shard_count}d}"


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # not the wall clock: the shard's bytes depend on its samples only
    info.mode = _MEMBER_MODE
    info.uname = info.gname = _MEMBER_USER
    return info


class OrderedWebDatasetWriter:
    """img2dataset's webdataset sample writer, in key order with fixed member metadata (module docstring).

    The constructor and `write`/`close` have img2dataset's `SampleWriter` signatures.
    """

    def __init__(self, shard_id: int, output_folder: str, save_caption: bool, oom_shard_count: int,
                 schema: pa.Schema, encode_format: str) -> None:
        self.folder = Path(output_folder)
        self.stem = _shard_stem(shard_id, oom_shard_count)
        self.save_caption = save_caption
        self.schema = schema
        self.encode_format = encode_format
        scratch = self.folder / SCRATCH_DIR
        scratch.mkdir(parents=True, exist_ok=True)
        # unique per writer: a shard resubmitted after a lost worker may still be running elsewhere
        self._spool_path = scratch / f"{self.stem}.{os.getpid()}.{secrets.token_hex(4)}.spool"
        self._spool = open(self._spool_path, "wb")  # noqa: SIM115 - closed in close()
        self._samples: list[tuple[str, list[_Member]]] = []
        self._rows: list[dict[str, Any]] = []

    def write(self, img_str: bytes | None, key: str, caption: str | None, meta: dict[str, Any]) -> None:
        """Spool one sample (its image is None when it failed: then only its metadata row is kept)."""
        meta = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in meta.items()}  # JSON-able
        if img_str is not None:
            sample: dict[str, bytes] = {self.encode_format: bytes(img_str)}
            if self.save_caption:
                sample["txt"] = (str(caption) if caption is not None else "").encode("utf-8")
            sample["json"] = json.dumps(meta, indent=4).encode("utf-8")
            members = []
            for ext in sorted(sample):  # webdataset's member order within a sample
                members.append((f"{key}.{ext}", self._spool.tell(), len(sample[ext])))
                self._spool.write(sample[ext])
            self._samples.append((key, members))
        self._rows.append(meta)

    def close(self) -> None:
        """Write NNNNN.tar and NNNNN.parquet in key order (each atomically), then drop the spool."""
        self._spool.close()
        try:
            # keys are zero-padded to one width, so string order is candidate order
            samples = sorted(self._samples, key=lambda s: s[0])
            with open(self._spool_path, "rb") as spool, atomic_path(self.folder / f"{self.stem}.tar") as tmp, \
                    tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:  # webdataset's
                for _, members in samples:
                    for name, offset, size in members:
                        spool.seek(offset)
                        tar.addfile(_tar_member(name, size), io.BytesIO(spool.read(size)))
            rows = sorted(self._rows, key=lambda row: row["key"])
            table = pa.Table.from_pydict({name: [row[name] for row in rows] for name in self.schema.names},
                                         self.schema)
            with atomic_path(self.folder / f"{self.stem}.parquet") as tmp:
                pq.write_table(table, tmp)
        finally:
            self._spool_path.unlink(missing_ok=True)


def write_stats(output_folder: str, shard_id: int, count: int, successes: int, failed_to_download: int,
                failed_to_resize: int, start_time: float, end_time: float, status_dict: Any,
                oom_shard_count: int) -> None:
    """img2dataset's `write_stats` (same signature), reproducible: no start, end or duration, the
    status counts sorted (module docstring)."""
    del start_time, end_time  # the wall clock stays out of the shard's files
    counts = dict(status_dict.dump())  # img2dataset's CappedCounter
    stats = {
        "count": count,
        "successes": successes,
        "failed_to_download": failed_to_download,
        "failed_to_resize": failed_to_resize,
        "status_dict": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
    atomic_write_json(Path(output_folder) / f"{_shard_stem(shard_id, oom_shard_count)}_stats.json", stats, indent=4)
