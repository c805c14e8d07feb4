"""Where pretrained weights come from, and the one error message for when they are missing offline.

Without network the hub clients retry each file with back-off (tens of seconds per model) before they
fall back to the local cache. `hub_access()` decides once per process whether the hub can be reached
(or honours `HF_HUB_OFFLINE`, read when called) and, when it cannot, runs the load in the hub client's
offline mode: the local cache is used at once, and a missing file fails at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from functools import cache
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0  # one TCP connect; a reachable hub answers in well under a second


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally and could not be downloaded."""


def hf_cache_dir() -> str:
    """The Hugging Face cache the hub clients read (HF_HUB_CACHE, else HF_HOME/hub)."""
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))


def weights_error(spec: str, source: str, err: BaseException) -> WeightsUnavailableError:
    """A clear error saying how to supply weights for `spec` (loaded from `source`)."""
    return WeightsUnavailableError(
        f"Could not load pretrained weights for {spec!r} from {source!r}: {type(err).__name__}: {err}\n"
        "Without network access, supply the weights in one of these ways:\n"
        f"  1. a local path: get_encoder('{spec.split(':', 1)[0]}:/path/to/weights-or-model-dir');\n"
        f"  2. the Hugging Face cache: run `hf download {source}` on a machine with internet "
        f"and copy the cache to {hf_cache_dir()} (set HF_HOME to point elsewhere);\n"
        "  3. for tests and demos, pretrained=False builds the same architecture with random weights."
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> tuple[str, int]:
    """(host, port) a hub request first connects to: the HTTPS proxy when one is set, else HF_ENDPOINT."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlsplit(proxy if proxy else endpoint)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@cache
def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    """Whether hub downloads should be skipped: HF_HUB_OFFLINE is set, or the hub did not answer
    (probed once per process and endpoint; the first miss is announced on stderr)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    host, port = hub_endpoint()
    known = _reachable.cache_info().currsize
    reachable = _reachable(host, port)
    if not reachable and _reachable.cache_info().currsize > known:
        print(
            f"Hugging Face hub unreachable ({host}:{port}): using the local cache only "
            "(set HF_HUB_OFFLINE=1 to skip this check).",
            file=sys.stderr,
        )
    return not reachable


@contextlib.contextmanager
def hub_access() -> Iterator[bool]:
    """Within the block, hub clients read only the local cache when the hub is offline; yields that."""
    offline = hub_offline()
    if not offline:
        yield False
        return
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; its request hook checks this constant.
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = saved
