"""Loopback stand-ins of the outside services (Pinecone's REST API, Reddit's listings and image hosts, a
fault-injecting proxy), shared by the tests and the benchmarks (which may not import ``tests``)."""
