"""Firebase hooks: the credentials plumbing and the two Firebase mobile publishers.

``FirebaseHook`` turns an Airflow connection of type ``google_cloud_platform`` (default conn id
``firebase_default``) into a named ``firebase_admin.App``. Credentials come from the connection
exactly as for every Google provider hook: a service-account key in the connection's extras
(``keyfile_dict``, or ``key_secret_name`` in Secret Manager), ``impersonation_chain``, or
Application Default Credentials when the connection names none. No key file lives in this repo.

Publishers (both implement ``MobileModelPublisher``; pick one per target with ``publish.backend``):

``FirebaseMLPublisherHook`` (``firebase_ml``)
    Firebase ML custom models through firebase-admin's ``ml`` module. Firebase ML is deprecated
    and shuts down on 2027-06-15; every publish logs one warning saying so.
``FirebaseStoragePublisherHook`` (``firebase_storage``)
    Its successor: the .tflite in Cloud Storage for Firebase under a versioned path plus a
    manifest object the app reads (and optionally a client Remote Config parameter).

Import cost: ``firebase_admin`` is imported inside methods only. The DAG file imports this module,
and the dag-processor re-imports everything that is not ``airflow.*`` on every parse: ``firebase_admin``
with google-auth's reauth modules cost 20-30 ms of each parse. ``firebase_admin.ml`` imports
tensorflow when it is installed (10-20 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from functools import cache
from typing import TYPE_CHECKING, Any

from airflow.providers.google.common.hooks.base_google import GoogleBaseHook

from dual_deploy.emulator_hosts import remote_config_base_url
from dual_deploy.hooks.mobile_publisher import MobileModelPublisher, PublishError, file_sha256
from dual_deploy.names import FIREBASE_ML_DISPLAY_NAME_PATTERN, FIREBASE_TAG_PATTERN

if TYPE_CHECKING:
    import firebase_admin

FIREBASE_ML_SHUTDOWN = date(2027, 6, 15)

# Firebase ML's rules (dual_deploy.names: the API's display-name rule, stricter than the SDK's
# _DISPLAY_NAME_PATTERN, and the SDK's _TAG_PATTERN). The storage backend applies the same rules so a
# target can switch backends without renaming its model.
# Firebase ML has no version number: this backend keeps one in a reserved tag ``v<N>``.
_VERSION_TAG = re.compile(r"^v(\d+)$")

_APPS_LOCK = threading.Lock()


def _validate_name_and_tags(display_name: str, tags: list[str]) -> list[str]:
    if not isinstance(display_name, str) or not FIREBASE_ML_DISPLAY_NAME_PATTERN.match(display_name):
        raise PublishError(
            f"display name {display_name!r} is invalid: 1-32 characters from letters, digits and '_', "
            "starting with a letter (Firebase ML's rule)"
        )
    bad = [t for t in tags if not isinstance(t, str) or not FIREBASE_TAG_PATTERN.match(t)]
    if bad:
        raise PublishError(f"tags {bad} are invalid: each 1-32 characters from [A-Za-z0-9_-] (Firebase ML's rule)")
    reserved = [t for t in tags if _VERSION_TAG.match(t)]
    if reserved:
        raise PublishError(f"tags {reserved} are reserved: tags of the form v<N> carry the published version")
    return sorted(set(tags))


def _version_from_tags(tags: list[str] | None) -> int:
    return max((int(m.group(1)) for t in tags or [] if (m := _VERSION_TAG.match(t))), default=0)


def _describe_firebase_error(what: str, error: Exception) -> str:
    """``<what> failed: HTTP 403 PERMISSION_DENIED: <server message>`` for a FirebaseError."""
    response = getattr(error, "http_response", None)
    status = f"HTTP {response.status_code} " if response is not None else ""
    code = getattr(error, "code", None) or type(error).__name__
    return f"{what} failed: {status}{code}: {error}"


@cache
def _google_auth_credential_class() -> type:
    """``_GoogleAuthCredential``: hands the hook's google-auth credentials to firebase_admin unchanged.
    Defined on first use, so that importing this module does not import firebase_admin."""
    from firebase_admin import credentials

    class _GoogleAuthCredential(credentials.Base):
        def __init__(self, credential):
            super().__init__()
            self._credential = credential

        def get_credential(self):
            return self._credential

    return _GoogleAuthCredential


class FirebaseHook(GoogleBaseHook):
    """Named ``firebase_admin.App`` built from an Airflow Google Cloud connection.

    :param firebase_conn_id: connection of type ``google_cloud_platform`` (keyfile JSON in the
        extras, or none for Application Default Credentials).
    :param firebase_project: the Firebase project id; default: the connection's ``project``
        extra or the credentials' project.
    :param storage_bucket: the Cloud Storage for Firebase bucket (``<project>.firebasestorage.app``
        or ``<project>.appspot.com``); becomes the app's ``storageBucket`` option.
    :param impersonation_chain: service account(s) to impersonate (impersonated credentials can
        sign URLs through IAM, which Firebase ML's upload needs).
    """

    conn_name_attr = "firebase_conn_id"
    default_conn_name = "firebase_default"
    hook_name = "Firebase"

    def __init__(self, firebase_conn_id: str = default_conn_name, firebase_project: str | None = None,
                 storage_bucket: str | None = None, impersonation_chain: str | list[str] | None = None, **kwargs):
        super().__init__(gcp_conn_id=firebase_conn_id, impersonation_chain=impersonation_chain, **kwargs)
        self.firebase_conn_id = firebase_conn_id
        self.firebase_project = firebase_project
        self.storage_bucket = storage_bucket

    def get_firebase_project(self) -> str:
        _, conn_project = self.get_credentials_and_project_id()
        project = self.firebase_project or conn_project
        if not project:
            raise PublishError(
                f"no Firebase project: set firebase_project (gcp.firebase_project) or the 'project' extra "
                f"of connection {self.firebase_conn_id!r}"
            )
        return project

    @property
    def app_name(self) -> str:
        return f"dual-deploy:{self.firebase_conn_id}:{self.get_firebase_project()}"

    def get_app(self) -> firebase_admin.App:
        """The app for this connection and project; created once per process, then reused.

        Buckets are always passed explicitly by the publishers, so a reused app whose
        ``storageBucket`` option differs does no harm.
        """
        import firebase_admin

        credentials, _ = self.get_credentials_and_project_id()
        project = self.get_firebase_project()
        name = self.app_name
        with _APPS_LOCK:
            try:
                return firebase_admin.get_app(name)
            except ValueError:
                options = {"projectId": project}
                if self.storage_bucket:
                    options["storageBucket"] = self.storage_bucket
                return firebase_admin.initialize_app(_google_auth_credential_class()(credentials), options=options,
                                                     name=name)


# --- Firebase ML -------------------------------------------------------------------------------


@contextmanager
def _quiet_firebase_ml_deprecation() -> Iterator[None]:
    # firebase-admin 7.7 warns on every ml call; publish() logs one clear warning instead.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Firebase ML is deprecated", category=DeprecationWarning)
        yield


class FirebaseMLPublisherHook(FirebaseHook, MobileModelPublisher):
    """Create-or-update a Firebase ML custom model by display name, then publish it.

    ``publish()``: list models filtered by display name; upload the .tflite (to
    ``gs://<storage_bucket>/Firebase/ML/Models/<display_name>-v<N>-<sha12>.tflite``: the SDK
    names the object after the file, so a unique name keeps models and versions apart); update the
    existing model (PATCH with an explicit updateMask) or create one; wait until the model is
    unlocked (``unlock_timeout_s`` per wait); publish. A second publish of the same display name
    updates the same model, never a duplicate.

    Version: Firebase ML has no version number, so the model carries a reserved tag ``v<N>``,
    N = the existing model's ``v`` tag + 1 (1 on create). It survives across runs with no extra
    state, shows in the console and can be listed (``tags:v3``); user tags of that form are refused.

    Credentials must be able to sign: the SDK hands Firebase ML a V4 signed URL of the upload. A
    service-account key in the connection or impersonation (IAM signBlob) can; plain ADC on
    GCE/GKE (compute-engine credentials) cannot and fails before anything is uploaded.
    """

    # What an update changes, spelled as firebase-admin-node's updateModel() spells it (that SDK
    # always sends a mask). The Python SDK's public ml.update_model() sends none, and a PATCH
    # without a mask updates only the fields present and non-empty (AIP-134), so an empty tag list
    # would silently keep the old tags; publish() therefore calls the service method that
    # ml.update_model() wraps, with this mask.
    UPDATE_MASK = "displayName,tags,tfliteModel.gcsTfliteUri"

    def __init__(self, firebase_conn_id: str = FirebaseHook.default_conn_name, firebase_project: str | None = None,
                 storage_bucket: str | None = None, unlock_timeout_s: float = 600,
                 impersonation_chain: str | list[str] | None = None, **kwargs):
        if not storage_bucket:
            raise PublishError("Firebase ML publishing needs storage_bucket (gcp.firebase_storage_bucket) for the upload")
        super().__init__(firebase_conn_id=firebase_conn_id, firebase_project=firebase_project,
                         storage_bucket=storage_bucket, impersonation_chain=impersonation_chain, **kwargs)
        self.unlock_timeout_s = unlock_timeout_s

    # -- helpers ---------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any], recover: Callable[[], Any] | None = None) -> Any:
        """Run one SDK call; FirebaseError/ValueError become PublishError naming the call.

        ``recover``: firebase-admin 7.7's ``_MLService.handle_operation`` re-reads a model whose
        operation is still running with ``get_model(model_id)`` *without the app*, which raises
        ValueError("The default Firebase app does not exist...") for a named app after the call
        itself succeeded (and would read the default app's project if there were one). ``recover``
        re-reads the model through this hook's app instead.
        """
        from firebase_admin import exceptions
        from google.auth.exceptions import GoogleAuthError

        try:
            return fn()
        except exceptions.FirebaseError as e:
            raise PublishError(_describe_firebase_error(f"Firebase ML {what}", e)) from e
        except GoogleAuthError as e:  # e.g. signing the upload URL through IAM failed
            raise PublishError(f"Firebase ML {what} failed (credentials / URL signing): {e}") from e
        except ValueError as e:
            if recover is not None and "default Firebase app" in str(e):
                self.log.info("Firebase ML %s returned a running operation; re-reading the model", what)
                return self._call(f"{what} (re-reading the model)", recover)
            raise PublishError(f"Firebase ML {what} failed: {e}") from e

    def _find(self, ml, app, display_name: str):
        models = self._call(
            "list_models",
            lambda: [m for m in ml.list_models(list_filter=f"display_name={display_name}", app=app).iterate_all()
                     if m.display_name == display_name],
        )
        if len(models) > 1:
            raise PublishError(
                f"{len(models)} Firebase ML models are named {display_name!r} (ids {[m.model_id for m in models]}); "
                "delete the duplicates: publishing updates exactly one model"
            )
        return models[0] if models else None

    def _wait_unlocked(self, model, display_name: str, after: str, check_validation: bool = True):
        from firebase_admin import exceptions

        if model.locked:
            self.log.info("Firebase ML model %s (id %s) is locked after %s; waiting up to %s s",
                          display_name, model.model_id, after, self.unlock_timeout_s)
            try:
                model.wait_for_unlocked(max_time_seconds=self.unlock_timeout_s)
            except exceptions.DeadlineExceededError as e:
                raise PublishError(
                    f"Firebase ML model {display_name!r} (id {model.model_id}) was still locked {self.unlock_timeout_s} s "
                    f"after {after} (unlock_timeout_s={self.unlock_timeout_s}); its operation is still running: "
                    "raise unlock_timeout_s or retry the task (publishing is idempotent)"
                ) from e
            except exceptions.FirebaseError as e:
                raise PublishError(
                    _describe_firebase_error(f"Firebase ML operation on model {display_name!r} after {after}", e)
                ) from e
        if check_validation and model.validation_error:
            raise PublishError(
                f"Firebase ML rejected model {display_name!r} (id {model.model_id}) after {after}: {model.validation_error}"
            )
        return model

    def _upload(self, ml, app, display_name: str, version: int, tflite_path: str, sha256: str):
        from google.api_core import exceptions as api_exceptions
        from google.auth.exceptions import GoogleAuthError

        with tempfile.TemporaryDirectory() as tmp:
            staged = os.path.join(tmp, f"{display_name}-v{version}-{sha256[:12]}.tflite")
            shutil.copyfile(tflite_path, staged)
            target = f"gs://{self.storage_bucket}/Firebase/ML/Models/{os.path.basename(staged)}"
            try:
                return ml.TFLiteGCSModelSource.from_tflite_model_file(staged, bucket_name=self.storage_bucket, app=app)
            except (api_exceptions.GoogleAPIError, GoogleAuthError, OSError) as e:
                raise PublishError(f"uploading {tflite_path} to {target} for Firebase ML failed: {e}") from e

    def _record(self, model, *, version: int, created: bool, tflite_uri: str | None = None) -> dict:
        fmt = model.model_format
        source = getattr(fmt, "model_source", None)
        size = getattr(fmt, "size_bytes", None)  # an int64: a string in the API's JSON
        return {
            "model_id": model.model_id,
            "display_name": model.display_name,
            "version": version,
            "tags": list(model.tags or []),
            "published": model.published,
            "model_hash": model.model_hash,
            "tflite_uri": tflite_uri or getattr(source, "gcs_tflite_uri", None),
            "created": created,
            "size_bytes": int(size) if size is not None else None,
            "etag": model.etag,
        }

    def _log_shutdown_warning(self, display_name: str) -> None:
        days = (FIREBASE_ML_SHUTDOWN - datetime.now(UTC).date()).days
        self.log.warning(
            "Firebase ML is deprecated and shuts down on %s (%d days from now): %r is published there until then. "
            "Switch this target's publish.backend to 'firebase_storage' (Cloud Storage for Firebase + a manifest "
            "the app reads); see https://firebase.google.com/docs/ml/migrate-to-cloud-storage",
            FIREBASE_ML_SHUTDOWN.isoformat(), days, display_name,
        )

    # -- MobileModelPublisher ----------------------------------------------------------------------

    def get(self, display_name: str) -> dict | None:
        from firebase_admin import ml

        with _quiet_firebase_ml_deprecation():
            model = self._find(ml, self.get_app(), display_name)
            return None if model is None else self._record(model, version=_version_from_tags(model.tags), created=False)

    def publish(self, display_name: str, tflite_path: str, tags: list[str], metadata: dict | None = None) -> dict:
        from google.auth.credentials import Signing

        user_tags = _validate_name_and_tags(display_name, list(tags))
        self._log_shutdown_warning(display_name)
        app = self.get_app()
        credential = app.credential.get_credential()
        if not isinstance(credential, Signing):
            raise PublishError(
                f"Firebase ML needs credentials that can sign a V4 URL for the upload; connection "
                f"{self.firebase_conn_id!r} gives {type(credential).__name__}. Put a service-account key in the "
                "connection (keyfile_dict / key_secret_name) or set impersonation_chain"
            )
        if metadata:
            self.log.info("Firebase ML models carry no free-form metadata; not stored: %s", sorted(metadata))

        from firebase_admin import ml  # imports tensorflow when installed: only here, never at parse time

        with _quiet_firebase_ml_deprecation():
            existing = self._find(ml, app, display_name)
            if existing is not None:
                # (a validation error of the previous file is no reason to stop: this upload replaces it)
                existing = self._wait_unlocked(existing, display_name, "a previous operation", check_validation=False)
            version = _version_from_tags(existing.tags if existing else None) + 1
            new_tags = [*user_tags, f"v{version}"]
            source = self._upload(ml, app, display_name, version, tflite_path, file_sha256(tflite_path))
            model_format = ml.TFLiteFormat(model_source=source)

            if existing is None:
                model = ml.Model(display_name=display_name, tags=new_tags, model_format=model_format)
                model = self._call("create_model", lambda: ml.create_model(model, app=app),
                                   recover=lambda: self._find(ml, app, display_name))
                if model is None:
                    raise PublishError(f"Firebase ML create_model for {display_name!r} succeeded but the model is not listed")
            else:
                model_id = existing.model_id
                update = ml.Model.from_dict({"name": f"projects/{app.project_id}/models/{model_id}",
                                             "displayName": display_name, "tags": new_tags}, app=app)
                update.model_format = model_format
                service = ml._get_ml_service(app)  # for the updateMask (see UPDATE_MASK); pinned SDK 7.7
                model = self._call(
                    "update_model",
                    lambda: ml.Model.from_dict(service.update_model(update, update_mask=self.UPDATE_MASK), app=app),
                    recover=lambda: ml.get_model(model_id, app=app),
                )
            verb = "create_model" if existing is None else "update_model"
            model = self._wait_unlocked(model, display_name, verb)

            model_id = model.model_id
            model = self._call("publish_model", lambda: ml.publish_model(model_id, app=app),
                               recover=lambda: ml.get_model(model_id, app=app))
            model = self._wait_unlocked(model, display_name, "publish_model")
            if not model.published:
                raise PublishError(f"Firebase ML model {display_name!r} (id {model_id}) is not published after publish_model")
        self.log.info("Firebase ML model %s (id %s) %s and published as v%d (%s)", display_name, model_id,
                      "created" if existing is None else "updated", version, source.gcs_tflite_uri)
        return self._record(model, version=version, created=existing is None, tflite_uri=source.gcs_tflite_uri)


# --- Cloud Storage for Firebase (Firebase ML's successor) --------------------------------------

REMOTE_CONFIG_PATH = "/v1/projects/{project}/remoteConfig"


class FirebaseStoragePublisherHook(FirebaseHook, MobileModelPublisher):
    """Publish the .tflite to Cloud Storage for Firebase and move the version pointer apps read.

    Layout in the bucket (``storage_bucket``)::

        mobile-models/<display_name>/v<N>/model.tflite   immutable, custom metadata sha256/tags/version
        mobile-models/<display_name>/manifest.json       the pointer: {display_name, version, path,
                                                         gs_uri, sha256, size_bytes, tags, updated_at,
                                                         metadata}, Cache-Control no-cache

    N = the manifest's version + 1. The manifest is written with ``if_generation_match`` set to
    the generation that was read (0 when there was none), so of two concurrent publishers only
    one claims a version; the other re-reads and takes the next. Each version file is written with
    ``if_generation_match=0`` so nobody overwrites a file another publisher is about to point at
    (an occupied slot is skipped: versions always increase but may have gaps). Publishing the
    bytes and tags the manifest already points at writes nothing (an Airflow retry after a late
    failure does not bump the version) but still applies the Remote Config step.

    ``remote_config_parameter``: also set this client Remote Config parameter (valueType JSON)
    to ``{"version", "path", "sha256", "size_bytes"}`` through the Remote Config REST API (GET,
    then PUT with the ETag in If-Match; a 412 re-reads and retries). firebase-admin's own
    ``remote_config`` module cannot do this: in 7.7 (read in site-packages) it only fetches
    *server* templates (``GET .../namespaces/firebase-server/serverRemoteConfig`` in
    ``_RemoteConfigService``) and evaluates them; it has no publish call at all. (Importing it
    also calls ``logging.basicConfig(level=INFO)``, another reason to keep away from it.)
    ``remote_config_session``: a requests-compatible session for that API (tests inject one);
    default: an ``AuthorizedSession`` over the hook's credentials.
    """

    PREFIX = "mobile-models"

    def __init__(self, firebase_conn_id: str = FirebaseHook.default_conn_name, firebase_project: str | None = None,
                 storage_bucket: str | None = None, remote_config_parameter: str | None = None,
                 remote_config_session=None, max_attempts: int = 5,
                 impersonation_chain: str | list[str] | None = None, **kwargs):
        if not storage_bucket:
            raise PublishError("firebase_storage publishing needs storage_bucket (gcp.firebase_storage_bucket)")
        super().__init__(firebase_conn_id=firebase_conn_id, firebase_project=firebase_project,
                         storage_bucket=storage_bucket, impersonation_chain=impersonation_chain, **kwargs)
        self.remote_config_parameter = remote_config_parameter
        self._remote_config_session = remote_config_session
        self.max_attempts = max_attempts

    # -- paths -----------------------------------------------------------------------------------

    def _manifest_path(self, display_name: str) -> str:
        return f"{self.PREFIX}/{display_name}/manifest.json"

    def _model_path(self, display_name: str, version: int) -> str:
        return f"{self.PREFIX}/{display_name}/v{version}/model.tflite"

    def _bucket(self):
        from firebase_admin import storage

        # A google-cloud-storage Bucket on the app's client; named explicitly (not the app's
        # storageBucket option) because apps are shared per connection + project.
        return storage.bucket(name=self.storage_bucket, app=self.get_app())

    # -- storage steps ---------------------------------------------------------------------------

    def _read_manifest(self, bucket, display_name: str) -> tuple[dict | None, int]:
        """(manifest, generation); (None, 0) when there is none."""
        blob = bucket.get_blob(self._manifest_path(display_name))
        if blob is None:
            return None, 0
        generation = int(blob.generation)
        data = blob.download_as_bytes(if_generation_match=generation)
        try:
            return json.loads(data), generation
        except ValueError as e:
            raise PublishError(f"gs://{bucket.name}/{blob.name} is not valid JSON: {e}") from e

    def _upload_version(self, bucket, display_name: str, version: int, tflite_path: str, sha256: str,
                        tags: list[str]) -> tuple[Any, int, bool]:
        """Write the file at the first free slot >= version: (blob, version, uploaded_by_us)."""
        from google.api_core.exceptions import PreconditionFailed

        for _ in range(self.max_attempts):
            blob = bucket.blob(self._model_path(display_name, version))
            blob.metadata = {"sha256": sha256, "tags": ",".join(tags), "display_name": display_name,
                             "version": str(version)}
            try:
                blob.upload_from_filename(tflite_path, content_type="application/octet-stream", if_generation_match=0)
                return blob, version, True
            except PreconditionFailed:
                current = bucket.get_blob(self._model_path(display_name, version))
                if current is not None and (current.metadata or {}).get("sha256") == sha256:
                    return current, version, False  # the same bytes are already there (an earlier attempt)
                self.log.warning("gs://%s/%s is taken by another publisher; trying v%d",
                                 bucket.name, self._model_path(display_name, version), version + 1)
                version += 1
        raise PublishError(f"no free version slot for {display_name!r} after {self.max_attempts} attempts")

    def _discard(self, blob) -> None:
        from google.api_core.exceptions import GoogleAPIError

        try:
            blob.delete(if_generation_match=blob.generation)
        except GoogleAPIError as e:  # best effort: an orphaned version file is harmless
            self.log.warning("could not delete orphaned gs://%s/%s: %s", blob.bucket.name, blob.name, e)

    # -- Remote Config -------------------------------------------------------------------------

    def _remote_config_error(self, method: str, url: str, response) -> PublishError:
        try:
            error = response.json().get("error", {})
        except ValueError:
            error = {}
        message = error.get("message") or response.text[:500]
        return PublishError(
            f"Remote Config {method} {url} failed: HTTP {response.status_code} {error.get('status', '')}: {message}"
        )

    def _set_remote_config(self, manifest: dict) -> dict:
        import requests

        session = self._remote_config_session
        if session is None:
            from google.auth.transport.requests import AuthorizedSession

            session = AuthorizedSession(self.get_credentials())
        url = remote_config_base_url() + REMOTE_CONFIG_PATH.format(project=self.get_firebase_project())
        value = json.dumps({k: manifest[k] for k in ("version", "path", "sha256", "size_bytes")}, sort_keys=True)
        for attempt in range(1, self.max_attempts + 1):
            try:
                result = self._remote_config_attempt(session, url, value, manifest)
            except requests.RequestException as e:
                raise PublishError(f"Remote Config request to {url} failed: {e}") from e
            if result is not None:
                return result
            self.log.warning("Remote Config changed since it was read (412 on If-Match); retrying (attempt %d/%d)",
                             attempt, self.max_attempts)
        raise PublishError(f"Remote Config {url} kept changing under us ({self.max_attempts} attempts, HTTP 412)")

    def _remote_config_attempt(self, session, url: str, value: str, manifest: dict) -> dict | None:
        """GET the template, set the parameter, PUT it back with If-Match; None on 412 (retry)."""
        parameter = self.remote_config_parameter
        got = session.get(url, headers={"Accept-Encoding": "gzip"}, timeout=60)
        if got.status_code != 200:
            raise self._remote_config_error("GET", url, got)
        etag = got.headers.get("ETag")
        if not etag:
            raise PublishError(f"Remote Config GET {url} returned no ETag header; cannot update safely")
        template = got.json()
        params = template.setdefault("parameters", {})
        for group in (template.get("parameterGroups") or {}).values():
            if parameter in (group.get("parameters") or {}):
                params = group["parameters"]  # a parameter lives either at the top or in one group
        entry = params.setdefault(parameter, {})
        if (entry.get("defaultValue") or {}).get("value") == value:
            self.log.info("Remote Config parameter %s already points at v%s", parameter, manifest["version"])
            return {"parameter": parameter, "value": value, "etag": etag, "changed": False}
        entry["defaultValue"] = {"value": value}
        entry.setdefault("valueType", "JSON")
        entry.setdefault("description", f"dual-deploy: current {manifest['display_name']} model (manifest.json)")
        if entry.get("conditionalValues"):
            self.log.warning("Remote Config parameter %s has conditional values; they still override the new "
                             "default for matching conditions", parameter)
        body = {k: v for k, v in template.items() if k != "version"}
        body["version"] = {"description": f"dual-deploy: {manifest['display_name']} -> v{manifest['version']}"}
        put = session.put(url, data=json.dumps(body), timeout=60,
                          headers={"If-Match": etag, "Content-Type": "application/json; UTF-8",
                                   "Accept-Encoding": "gzip"})
        if put.status_code == 412:
            return None
        if put.status_code != 200:
            raise self._remote_config_error("PUT", url, put)
        self.log.info("Remote Config parameter %s -> v%s", parameter, manifest["version"])
        return {"parameter": parameter, "value": value, "etag": put.headers.get("ETag"), "changed": True}

    # -- MobileModelPublisher ----------------------------------------------------------------------

    def _record(self, manifest: dict, *, created: bool, remote_config: dict | None) -> dict:
        return {
            "model_id": f"gs://{self.storage_bucket}/{self.PREFIX}/{manifest['display_name']}",
            "display_name": manifest["display_name"],
            "version": manifest["version"],
            "tags": list(manifest.get("tags", [])),
            "published": True,
            "model_hash": manifest["sha256"],
            "tflite_uri": manifest["gs_uri"],
            "created": created,
            "manifest_uri": f"gs://{self.storage_bucket}/{self._manifest_path(manifest['display_name'])}",
            "size_bytes": manifest.get("size_bytes"),
            "updated_at": manifest.get("updated_at"),
            "remote_config": remote_config,
        }

    def get(self, display_name: str) -> dict | None:
        manifest, _ = self._read_manifest(self._bucket(), display_name)
        return None if manifest is None else self._record(manifest, created=False, remote_config=None)

    def publish(self, display_name: str, tflite_path: str, tags: list[str], metadata: dict | None = None) -> dict:
        from google.api_core.exceptions import GoogleAPIError, NotFound, PreconditionFailed

        tags = _validate_name_and_tags(display_name, list(tags))
        sha256 = file_sha256(tflite_path)
        size = os.path.getsize(tflite_path)
        try:
            bucket = self._bucket()
            for attempt in range(1, self.max_attempts + 1):
                try:
                    previous, generation = self._read_manifest(bucket, display_name)
                except (NotFound, PreconditionFailed):
                    continue  # the manifest changed while being read
                if previous and previous.get("sha256") == sha256 and sorted(previous.get("tags", [])) == tags:
                    self.log.info("%s v%s already holds these bytes (sha256 %s); nothing new to publish",
                                  display_name, previous["version"], sha256[:12])
                    return self._record(previous, created=False, remote_config=self._maybe_remote_config(previous))
                blob, version, uploaded = self._upload_version(
                    bucket, display_name, (previous or {}).get("version", 0) + 1, tflite_path, sha256, tags)
                manifest = {
                    "display_name": display_name,
                    "version": version,
                    "path": blob.name,
                    "gs_uri": f"gs://{bucket.name}/{blob.name}",
                    "sha256": sha256,
                    "size_bytes": size,
                    "tags": tags,
                    "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "metadata": metadata or {},
                }
                pointer = bucket.blob(self._manifest_path(display_name))
                pointer.cache_control = "no-cache, max-age=0"
                try:
                    pointer.upload_from_string(json.dumps(manifest, indent=1, sort_keys=True, default=str),
                                               content_type="application/json", if_generation_match=generation)
                except PreconditionFailed:
                    self.log.warning("manifest of %s changed since it was read (generation %s): another publisher "
                                     "claimed a version; retrying (attempt %d/%d)", display_name, generation,
                                     attempt, self.max_attempts)
                    if uploaded:
                        self._discard(blob)
                    continue
                self.log.info("%s v%d -> gs://%s/%s (sha256 %s)", display_name, version, bucket.name, blob.name,
                              sha256[:12])
                return self._record(manifest, created=previous is None,
                                    remote_config=self._maybe_remote_config(manifest))
        except GoogleAPIError as e:
            raise PublishError(f"Cloud Storage for Firebase publish of {display_name!r} to gs://{self.storage_bucket} "
                               f"failed: {e}") from e
        raise PublishError(f"could not claim a version for {display_name!r}: the manifest kept changing "
                           f"({self.max_attempts} attempts)")

    def _maybe_remote_config(self, manifest: dict) -> dict | None:
        return self._set_remote_config(manifest) if self.remote_config_parameter else None
