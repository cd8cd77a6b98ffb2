"""The return path from sioworkersd: the results consumer, its records, and the legacy shim."""
