"""Point the Google client libraries at local stand-ins, by environment variable only.

- ``STORAGE_EMULATOR_HOST`` (google-cloud-storage honours it itself): the GCS emulator.
- ``VERTEX_AI_EMULATOR_HOST=host:port``: every gRPC channel the Vertex AI clients open to
  ``*aiplatform.googleapis.com`` goes to ``host:port`` instead, in plain text and without
  credentials: the channel is the only thing replaced, so the provider's hooks, operators and
  triggers and the ``aiplatform_v1`` clients run unmodified against the local Vertex AI server
  (``emulators/localcloud``). Its REST side (prediction URLs) is on the next port.
- ``FIREBASE_REMOTE_CONFIG_EMULATOR_HOST=host:port``: the Remote Config REST API
  (``hooks/firebase.py`` builds its URL with ``remote_config_base_url()``).

Unset (Cloud Composer, any real deployment), nothing changes. ``install()`` runs when
``dual_deploy`` is imported, which happens in every process that talks to Vertex AI for this
project: task processes (they import the DAG file) and the triggerer (it imports
``dual_deploy.triggers``). The host is read when a channel is created, not at install time.
"""

from __future__ import annotations

import os

VERTEX_AI_EMULATOR_HOST = "VERTEX_AI_EMULATOR_HOST"
FIREBASE_REMOTE_CONFIG_EMULATOR_HOST = "FIREBASE_REMOTE_CONFIG_EMULATOR_HOST"
_VERTEX_DOMAIN = "aiplatform.googleapis.com"
_installed = False


def vertex_emulator_host() -> str | None:
    return os.environ.get(VERTEX_AI_EMULATOR_HOST) or None


def _emulated(target) -> str | None:
    """The emulator address if ``target`` (``us-central1-aiplatform.googleapis.com:443``) is Vertex AI."""
    host = vertex_emulator_host()
    if not host or not isinstance(target, str):
        return None
    return host if target.rsplit(":", 1)[0].endswith(_VERTEX_DOMAIN) else None


def install() -> bool:
    """Wrap google.api_core's channel factories (sync and asyncio) once. True if the switch is on."""
    global _installed
    if not vertex_emulator_host():
        return False
    if _installed:
        return True
    import grpc
    from google.api_core import grpc_helpers, grpc_helpers_async

    make_sync, make_async = grpc_helpers.create_channel, grpc_helpers_async.create_channel

    def create_channel(target, *args, **kwargs):
        host = _emulated(target)
        return grpc.insecure_channel(host) if host else make_sync(target, *args, **kwargs)

    def create_channel_async(target, *args, **kwargs):
        host = _emulated(target)
        return grpc.aio.insecure_channel(host) if host else make_async(target, *args, **kwargs)

    grpc_helpers.create_channel = create_channel
    grpc_helpers_async.create_channel = create_channel_async
    _installed = True
    return True


def vertex_rest_base_url(region: str) -> str:
    """Base URL of Vertex AI's REST API for ``region`` (the emulator's HTTP port when switched)."""
    host = vertex_emulator_host()
    if host:
        name, _, port = host.rpartition(":")
        return f"http://{name}:{int(port) + 1}"
    return f"https://{region}-{_VERTEX_DOMAIN}"


def remote_config_base_url() -> str:
    host = os.environ.get(FIREBASE_REMOTE_CONFIG_EMULATOR_HOST)
    return f"http://{host}" if host else "https://firebaseremoteconfig.googleapis.com"
