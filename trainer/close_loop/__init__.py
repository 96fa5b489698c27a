"""Closing the loop after a training run: evaluation, the promotion gate, export, serving and the online watch
(docs/close_loop.md), with their settings (``settings.py``) and CLI commands (``cli.py``)."""
