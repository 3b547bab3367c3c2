"""agsopt's benchmark suite: ``python -m benchmarks [--quick|--full] [--out DIR] [--only NAME]``.

Each benchmark is a module with a ``run(quick: bool) -> dict`` function returning a report
(see :func:`benchmarks.common.make_report`); :mod:`benchmarks.__main__` lists them in its
``BENCHMARKS`` registry and writes every report as JSON and Markdown. See
``benchmarks/README.md`` for what each one measures and how to read the tables.
"""
