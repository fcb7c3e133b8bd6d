"""A stand-in training container for tests of the training path: writes what the real trainer
publishes under AIP_MODEL_DIR (metrics.json, labels.txt) through google-cloud-storage (the GCS
emulator via STORAGE_EMULATOR_HOST), or fails like it does on bad data.

``python trainer.py [--exit-code N] [--sleep S] [--accuracy A]``
"""

import argparse
import json
import os
import sys
import time

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

p = argparse.ArgumentParser()
p.add_argument("--exit-code", type=int, default=0)
p.add_argument("--sleep", type=float, default=0)
p.add_argument("--accuracy", type=float, default=0.9)
a, _ = p.parse_known_args()
time.sleep(a.sleep)
if a.exit_code:
    print("ERROR: the dataset has only one class", file=sys.stderr)
    sys.exit(a.exit_code)
bucket_name, _, prefix = os.environ["AIP_MODEL_DIR"].removeprefix("gs://").partition("/")
bucket = storage.Client(project="local-project", credentials=AnonymousCredentials()).bucket(bucket_name)
metrics = {"accuracy": a.accuracy, "macro_f1": a.accuracy, "num_examples": 2, "labels": ["daisy", "rose"]}
bucket.blob(prefix + "metrics.json").upload_from_string(json.dumps(metrics))
bucket.blob(prefix + "labels.txt").upload_from_string("daisy\nrose\n")
print(f"wrote {os.environ['AIP_MODEL_DIR']}metrics.json; CLOUD_ML_JOB_ID={os.environ.get('CLOUD_ML_JOB_ID')}")
