"""Helpers shared by the tests: synthetic data and experiments (``helpers.data``) and
processes run with faults injected (``helpers.faults``, which runs ``tests/fault_wrapper.py``)."""
