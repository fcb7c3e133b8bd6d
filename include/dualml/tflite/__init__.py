"""TFLite conversion and validation of the mobile model (no Airflow).

``convert`` turns the trained Keras classifier into a ``.tflite`` flatbuffer in one of
:data:`MODES`; ``validate`` runs it in the LiteRT interpreter next to the Keras model on
held-out images and gates it on agreement, accuracy drop and size.

Importing this package is cheap: TensorFlow, Keras and LiteRT are imported inside the
functions that need them, so an Airflow operator module can import it at DAG-parse time.
"""

from dualml.tflite.convert import (
    MODES,
    ConversionResult,
    convert,
    convert_file,
    is_tflite_flatbuffer,
    load_keras_model,
    representative_images_from_manifest,
)
from dualml.tflite.validate import (
    REPORT_FIELDS,
    TFLiteValidationError,
    Thresholds,
    check_thresholds,
    infer_mode,
    raise_for_failures,
    validate,
    validate_on_split,
)

__all__ = [
    "MODES",
    "REPORT_FIELDS",
    "ConversionResult",
    "TFLiteValidationError",
    "Thresholds",
    "check_thresholds",
    "convert",
    "convert_file",
    "infer_mode",
    "is_tflite_flatbuffer",
    "load_keras_model",
    "raise_for_failures",
    "representative_images_from_manifest",
    "validate",
    "validate_on_split",
]
