"""Subcommands of `snapgen`; each module has register(subparsers)."""
