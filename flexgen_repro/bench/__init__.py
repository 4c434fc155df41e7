"""Benchmarks: suites as data (suites/), the per-case runner, the accelerate baseline, the hardware
limit of a case, and the tables and plots made from raw JSON records."""
