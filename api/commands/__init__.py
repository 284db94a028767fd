"""The ``swquant`` command line and the Python client it talks to a server with."""
