"""witclip's data stages as plain functions over directories and manifests: paths and settings in,
paths, manifests and counts out. One subpackage per stage, in pipeline order, plus their support:

    synthetic/  the embedded web (scenes, site with faults, loopback server)
    harvest/    pages / URL lists / WARC -> candidates.parquet; WIT-style query balancing
    crawl/      img2dataset on Dask through the guarded fetcher; status.parquet
    dedup/      exact, benchmark decontamination, near-duplicate clusters (perceptual hashes)
    shards/     shard format, writer, training loader, caption tokenizer
    eval/       benchmark registry (tasks as data), readers, metrics, the zero-shot suite
    acquire/    resumable verified downloads: benchmarks, URL lists, weights
    common/     manifests and hashing, atomic writes, the HTTP policy layer, URL normalisers, Dask client
"""
