"""Entry points: the ``imgsearch`` commands (``cli.main``), the demo (``cli.demo``) and the process stack that
the demo, the integration tests and the benchmarks start (``cli.stack``)."""
