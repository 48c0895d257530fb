"""Fuzzing onnx-resync: hostile files through the loader, the walker and every CLI command.

`cases` builds seed models and mutates them (structured and byte-level); `harness` runs CLI
commands in a resource-limited worker process with a timeout per command and classifies what
happened. The test modules here (test_*.py) are the fast part; tools/fuzz.py runs a long campaign.
"""
