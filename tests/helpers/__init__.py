"""Test helpers: scripts run in subprocesses (`*_entry.py`, the PyTorch clients) and modules the tests import."""
