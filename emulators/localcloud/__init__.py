"""localcloud: a local Vertex AI API server (and a Firebase Remote Config stand-in) for dual-deploy.

It speaks the real ``google.cloud.aiplatform.v1`` gRPC API with the real message types, for the
part of Vertex AI this project uses, so the Google provider's unmodified hooks, operators and
triggers run against it on a laptop and in CI:

- JobService: custom jobs run each worker pool's container command as local processes with
  Vertex's environment (AIP_MODEL_DIR, AIP_CHECKPOINT_DIR, TF_CONFIG, ...);
- ModelService: the Model Registry (versions under a parent, aliases, ``default``);
- EndpointService: endpoints, deployed models as serving processes, traffic splits;
- PredictionService: Predict / RawPredict routed by the traffic split (also over REST);
- google.longrunning.Operations for the calls that return operations.

Clients reach it through ``VERTEX_AI_EMULATOR_HOST`` (see ``dual_deploy.emulator_hosts``), the
way google-cloud-storage reaches a GCS emulator through ``STORAGE_EMULATOR_HOST``. State lives in
one SQLite database (atomic, survives ``kill -9``); see ``store.py``. Never imported by DAG code.
"""
