"""What every stage shares: manifests and hashing, atomic file writes, the HTTP policy layer
(address guard, user agent, robots.txt, Retry-After, deadlines), URL normalisers, the Dask client."""
