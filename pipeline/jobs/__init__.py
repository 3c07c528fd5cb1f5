"""A job's life, in one package: ``commands`` (every Redis operation of it, as a typed command, and the sync
and async executors that run them under one policy), ``keys`` (every Redis key), ``queues`` (the broker's
layout), ``store`` (create, send, events, end, cancel, release, follow, wait; sync and async faces over the
commands), ``recovery`` (rescue and reap), ``fleet`` (the workers' heartbeats, written and read, and the queue
depth) and ``runner`` (one job through the Searcher). See docs/architecture.md.

Import from the modules; this package imports nothing, so the API can use the store without the Searcher."""
