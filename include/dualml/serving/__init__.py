"""Serving application: ``python -m dualml.serving --help``.

An HTTP prediction server for the exported SavedModel (``dualml.trainer.export``) that follows
Vertex AI's custom serving container contract (AIP_HTTP_PORT, AIP_PREDICT_ROUTE,
AIP_HEALTH_ROUTE, AIP_STORAGE_URI). Standard library HTTP, TensorFlow for the model, no Airflow.
Importing this package is cheap: TensorFlow is imported only when a model is loaded.

- ``protocol``: request parsing / response JSON (pure Python)
- ``model``:    loading the SavedModel, image checks, predictions (TensorFlow)
- ``app``:      the HTTP server and command line
"""
