"""Pantau collector: ingest, store, classify, serve."""
