"""``sd35``: a command line for sd35_core — a drop-in for Stability's ``sd3_infer.py`` and an offline demo."""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``sd35`` command line (see :func:`sd35_cli.main.main`)."""
    from .main import main as _main

    return _main(argv)
