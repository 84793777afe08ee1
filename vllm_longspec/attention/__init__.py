"""Hybrid tree attention: paged prefix with LSE + masked speculative part + merge."""
