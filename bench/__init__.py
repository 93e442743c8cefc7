"""Benchmark tooling: the naive baseline app (bench.naive) and the scenario runner (run.py).

Nothing here is part of the product: esports_chat never imports it.
"""
