"""Reliability tests: faults, bad input, secrets and load against real processes on loopback.

Their shared pieces live in tests/support/ (model_like, processes, checks).
"""
