"""Throughput benchmark of the two Beam jobs against plain Python loops doing the same work."""
