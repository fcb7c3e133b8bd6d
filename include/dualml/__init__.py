"""ML core of dual-deploy: data, training, export, TFLite and serving.

This package never imports Airflow. It runs inside the Vertex AI training and serving
containers on GCP and as plain processes on a laptop (the local platform).
Modules that need TensorFlow import it themselves; ``dataset``, ``storage`` and
``sample_data`` stay light so Airflow tasks can use them at parse time.
"""
