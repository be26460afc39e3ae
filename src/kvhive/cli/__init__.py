"""The ``kvhive`` command line (``kvhive.cli.main:main``)."""
