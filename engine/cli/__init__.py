"""Command groups of `python -m engine`: each module has `register(subparsers)`."""
