"""Search: one query through encode -> retrieve -> fetch -> rerank -> fuse.

``searcher`` (the Searcher, which picks a plan per query kind: ``plans``), ``fusion`` (the fused score and the
ranking), ``feature_source`` (stored BLIP features, nearest first), ``batching`` (cross-query batching of model
calls), ``image_query`` (an image query's picture: the API checks it, the worker reads it back) and ``explain``
(why a result matched). The model-version check stays in ``pipeline.versions``: ingest writes the versions it
checks.

Import from the modules; this package imports nothing, so the API can check a picture or send an explain task
without loading the Searcher."""
