"""A job's life, in one package: ``keys`` (every Redis key), ``store`` (create, send, events, end, cancel,
release, follow, wait; sync and async), ``recovery`` (rescue and reap), ``fleet`` (the workers' heartbeats,
written and read) and ``runner`` (one job through the Searcher). See docs/architecture.md.

Import from the modules; this package imports nothing, so the API can use the store without the Searcher."""
