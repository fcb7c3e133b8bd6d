"""``get_test_run(dag)``: the pytest entry point the example DAGs expose; built at parse time, never run here."""

from __future__ import annotations


def get_test_run(dag):
    def test_run():
        dag.test()

    test_run.__name__ = f"test_run_{dag.dag_id}"
    return test_run
