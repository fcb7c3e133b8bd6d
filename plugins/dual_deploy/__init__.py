"""dual-deploy's Airflow side: configuration, hooks, operators and the per-platform
task builders the DAG files assemble. Importable as a package from Airflow's plugins
folder. Nothing here imports tensorflow, keras, ai_edge_litert or firebase_admin.ml at
module level: DAG parsing must stay fast.
"""

from dual_deploy.emulator_hosts import install as _install_emulator_switch

# VERTEX_AI_EMULATOR_HOST (local platform, tests): route Vertex AI channels to the local server.
# A no-op when unset, i.e. on Composer.
_install_emulator_switch()
