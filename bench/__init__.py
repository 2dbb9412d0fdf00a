"""Benchmarks for stm (not tests): ``python -m bench --help``.

Each benchmark is a module ``bench/<name>.py`` registered in ``bench.__main__.BENCHMARKS``
that exposes ``run(args) -> list[Row]`` and, optionally, ``add_arguments(parser)``.
"""
