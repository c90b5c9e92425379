"""The ``zstore`` admin CLI: a thin client of the meta JSON API (docs/api.md).

``main`` parses arguments and prints; ``client`` finds a live meta server and
speaks HTTP to it; ``output`` renders tables. Only the standard library is
imported on the common path, so a command starts in well under a second.
"""
