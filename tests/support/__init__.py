"""Test fixtures (not installed with the package): tiny random bases, random bundles, the HF + PEFT oracle and
random kernel problems. Benchmarks import them too (they put ``tests/`` on ``sys.path``)."""
