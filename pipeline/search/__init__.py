"""Search: one query through encode -> retrieve -> fetch -> rerank -> fuse.

``searcher`` (the Searcher, which picks a plan per query kind: ``plans``), ``fusion`` (the fused score and the
ranking), ``feature_source`` (stored BLIP features, nearest first), ``batching`` (cross-query batching of model
calls), ``versions`` (the model-version check), ``image_query`` (an image query's picture: the API checks it, the
worker reads it back) and ``explain`` (why a result matched).

Import from the modules; this package imports nothing, so the API can check a picture or send an explain task
without loading the Searcher."""
