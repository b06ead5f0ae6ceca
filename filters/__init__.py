"""Scorers and the filter chain (stage 4). Import submodules directly; nothing heavy is imported here.

- ``filters.text``: length, unchanged, repetition, truncated (no model)
- ``filters.semantic``, ``filters.nli``, ``filters.clipscore``, ``filters.reward``: model scorers
- ``filters.chain``: which scorers run, in which order, and the decision per rewrite
- ``filters.sql``: the same decisions as set-based SQL (``--rethreshold``) and the work query
- ``filters.shard``: the stage over one shard; ``filters.funnel``: the funnel and reward distribution
- ``filters.tiny``: scorer models made locally for tests, the demo and benchmarks
"""
