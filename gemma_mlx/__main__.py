"""The `gemma-mlx` command (also `python -m gemma_mlx`): set up the process, then run the CLI in cli.py.

Imports nothing heavy before ``interrupts.route_to_main_thread``: that must run while this is the only thread.
"""

from __future__ import annotations


def main() -> None:
    """On Linux, first re-execute with a fast BLAS preloaded when one is installed; then the CLI."""
    import sys

    from . import settings
    from .errors import ConfigError

    try:
        settings.get()  # first: the re-exec below already reads GEMMA_MLX_BLAS
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from .interrupts import route_to_main_thread
    from .platform import reexec_with_fast_blas

    reexec_with_fast_blas()  # before the routing: an exec keeps the blocked mask but not the watcher
    route_to_main_thread()
    from .cli import cli

    cli()


if __name__ == "__main__":
    main()
