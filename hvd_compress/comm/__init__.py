"""Collectives that move payloads between ranks (imported lazily: mpi4py, Horovod)."""
