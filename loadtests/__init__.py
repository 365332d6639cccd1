"""Reproducible load runs that print figures (see loadtests/README.md)."""
