"""Benchmarks for budget_actor: ``python -m bench [NAME ...]`` (or ``nox -s bench``).

Each scenario is one function in :data:`bench.scenarios.SCENARIOS` that runs
for a bounded time and returns :class:`bench.rows.Row` figures; ``__main__``
prints them as one table and writes them to ``bench/results.json``.
"""
