"""The ``ctxext`` command line (``main``); ``python -m ctxext.cli`` runs it too."""

from ctxext.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
