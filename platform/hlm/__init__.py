"""HLM: distil a big teacher retriever into a small student query encoder and serve it on Ray.

The library is imported as ``hlm``; its sources live in ``platform/hlm`` (``platform/`` itself is a
source folder and must never become a package, or it would shadow the standard ``platform`` module).
"""

__version__ = "0.1.0"
