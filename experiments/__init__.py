"""Runnable experiments: ``python -m experiments.<name> --config FILE [--key value ...]``."""
