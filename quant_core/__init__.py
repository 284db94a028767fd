"""SWQuant's numerical library: losses, quantization grid, methods and the blockwise engine.

It imports nothing from the service (web, queue, database) so it can run alone as a library or a CLI.
"""

__version__ = "0.1.0"
