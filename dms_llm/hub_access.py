"""Fail fast without a network: one quick probe of the Hub instead of a minute of retries.

With no network, ``huggingface_hub`` retries each request five times with back-off (about 30 s and
a dozen log lines per file) before it looks in the local cache. ``use_cache_if_offline`` probes the
Hub's host once (3 s at most); when it cannot be reached, this process switches to offline mode, so
cached models and datasets load at once and anything else fails in one line (the callers' errors
say that the Hub could not be reached).

Example:
    >>> from dms_llm.hub_access import use_cache_if_offline
    >>> use_cache_if_offline()  # doctest: +SKIP
    False
"""

from __future__ import annotations

import os
import socket
import sys
from functools import cache
from urllib.parse import urlparse

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens (True behind a proxy: it cannot be told)."""
    from huggingface_hub import constants

    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def use_cache_if_offline() -> bool:
    """Switch this process to the local cache when the Hub is unreachable; True if offline now."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # for libraries imported later
    constants.HF_HUB_OFFLINE = True  # what huggingface_hub.is_offline_mode() returns
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return True
