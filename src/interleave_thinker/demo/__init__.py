"""Tiny offline models for `interleave demo` and the tests: real architectures, random or scripted weights."""
