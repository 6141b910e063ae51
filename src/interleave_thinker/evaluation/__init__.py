"""Benchmarks through the pipeline: generate (``run``), judge (``judge``, ``scoring``), compare.

One module per benchmark (``ueval``, ``wise``, ``risebench``, ``comm``) reads its items, writes
the layout its own scorer reads and applies its formulas; ``judge`` is the generic judge layer
(any LangChain chat model, retries, a cache of verdicts) that training rewards reuse.
"""
