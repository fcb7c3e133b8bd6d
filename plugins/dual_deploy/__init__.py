"""dual-deploy's Airflow side: configuration, hooks, operators and the per-platform
task builders the DAG files assemble. Importable as a package from Airflow's plugins
folder. Nothing here imports tensorflow, keras, ai_edge_litert or firebase_admin.ml at
module level: DAG parsing must stay fast.
"""
