"""HTTP policies the tests use against their own loopback servers."""

from data.common.http import HttpPolicy


def loopback(timeout: float = 10.0) -> HttpPolicy:
    """The default policy, with 127.0.0.1 exempt from the address guard (where test servers listen)."""
    return HttpPolicy(timeout=timeout, allowed_addresses=("127.0.0.1",))
