"""The Hugging Face Hub: is it reachable, and what to do when it is not.

With no network and no HF_HUB_OFFLINE, huggingface_hub retries each request with back-off for about
25 s before it fails (and only then falls back to its cache). One TCP connection to the hub,
with a short timeout, answers the question first; when it fails, this process switches to the
hub libraries' offline mode, so cached models and datasets load at once and missing ones fail at
once, with our message.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from tuner import offline
from tuner.data.specs import specs_from_options
from tuner.offline import NO_NETWORK_FIX, _state, endpoint_host, unreachable_note  # noqa: F401  (callers use hub's names)

logger = logging.getLogger(__name__)

PROBE_SECONDS = 3.0



def reachable(timeout: float = PROBE_SECONDS) -> bool:
    """One TCP connection to the hub's endpoint: DNS failure, refusal or silence means no."""
    host, port = endpoint_host()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_offline() -> bool:
    return _state["unreachable"] or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def needs_hub(cfg) -> bool:
    """Does this run name anything that lives on the hub (rather than on disk)?"""
    model = cfg.model_name_or_path
    model_on_hub = not offline.is_offline_reference(model) and not Path(model).exists()
    teacher = getattr(cfg, "teacher_model_name_or_path", None)
    return (
        model_on_hub or bool(cfg.dataset_name) or bool(cfg.push_to_hub) or bool(teacher and not Path(teacher).exists())
        or any(spec.dataset_name for spec in specs_from_options(cfg))
    )  # fmt: skip


def check_access(cfg) -> None:
    """Before anything is fetched: when the hub is needed but unreachable, go offline (cache only)."""
    if is_offline() or not needs_hub(cfg):
        return
    if not reachable():
        host, _ = endpoint_host()
        logger.warning("%s is unreachable: using only the local cache (as with HF_HUB_OFFLINE=1)", host)
        go_offline()
    if cfg.push_to_hub:
        warn_before_pushing(cfg)


def go_offline() -> None:
    """Offline mode for this process. The hub libraries read HF_HUB_OFFLINE once, at import, into
    module constants; this is the one place that sets them (tests/test_hub.py checks it works)."""
    import datasets.config
    import huggingface_hub.constants

    _state["unreachable"] = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True



def warn_before_pushing(cfg) -> None:
    """--push_to_hub happens at the end of the run: say now if it will fail then."""
    from huggingface_hub import get_token

    if is_offline():
        logger.warning("--push_to_hub: the hub is unreachable (or HF_HUB_OFFLINE is set); the push at the end will fail")
    elif get_token() is None:
        logger.warning("--push_to_hub: no token (set HF_TOKEN or run `hf auth login`); the push at the end will fail")
    if not cfg.hub_model_id:
        logger.warning("--push_to_hub without --hub_model_id: the repository will be named after --output_dir (%s)",
                       Path(cfg.output_dir).name)  # fmt: skip
