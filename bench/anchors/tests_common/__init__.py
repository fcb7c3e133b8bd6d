"""Stand-ins for the two helpers of apache/airflow's ``tests_common`` package that the provider's
system-test example DAGs import at module level (the package is not published on PyPI). They build
what the originals build at parse time, so the anchor DAG parses with the same task count, and do
nothing else."""
