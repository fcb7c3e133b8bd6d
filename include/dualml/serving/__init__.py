"""Serving application: ``python -m dualml.serving --help``.

An HTTP prediction server for the exported SavedModel (``dualml.trainer.export``) that follows
Vertex AI's custom serving container contract (AIP_HTTP_PORT, AIP_PREDICT_ROUTE,
AIP_HEALTH_ROUTE, AIP_STORAGE_URI). Split KServe-style: the model (load, ready, predict) knows
nothing of HTTP, the HTTP layer is a maintained ASGI stack (Starlette on uvicorn). No Airflow;
importing this package is cheap: TensorFlow is imported only when a model is loaded.

- ``protocol``: request parsing / response JSON (pure Python)
- ``model``:    fetching (only the serving files), loading, warming the SavedModel; predictions (TensorFlow)
- ``batching``: server-side dynamic batching of concurrent requests (threads)
- ``app``:      the Starlette app: routes, readiness, limits, back-pressure, request logs
- ``logs``:     Cloud Logging structured (JSON) log lines
- ``server``:   command line / environment, uvicorn, SIGTERM draining
"""
