"""Subcommands of `based`, one module each (see based/cli.py)."""
