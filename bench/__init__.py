"""The latency report of SPEC section 7: ``python -m bench.report`` (main job), ``pytest bench/``."""
