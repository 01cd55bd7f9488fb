"""``python -m gateway.cli``: the ``ce-gateway`` command line, as tests and the demo run it."""

from gateway.cli import app

if __name__ == "__main__":  # pragma: no cover
    app()
