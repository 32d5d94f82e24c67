"""Benchmarks kiln prints but does not assert: each module has main() and functions returning its figures."""
