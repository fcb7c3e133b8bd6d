"""A local stand-in for Vertex AI AutoML image classification (single label).

The local Vertex AI server (``emulators/localcloud``) runs ``python -m dualml.automl`` as the child
process of an AutoML training pipeline: a budget-bounded model search over the backbones and image
sizes the custom trainer supports (``search.py``, ``space.py``), which writes the best model in the
formats Vertex AI exports an AutoML Edge model in (``export.py``: a SavedModel, a quantized
``.tflite`` with ``dict.txt``) and its evaluation on the test split. ``serve.py`` answers online
predictions for a deployed AutoML model in Vertex's AutoML request/response format;
``edge_model.py`` loads an exported SavedModel as a reference classifier (TFLite validation, the
champion gate). Never imports Airflow.
"""
