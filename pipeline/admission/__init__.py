"""How a job gets in: ``callers`` (API keys, who is calling, ownership and roles), ``addresses`` (the client's
address, X-Forwarded-For behind trusted proxies), ``limits`` (rate limit, in-flight and stream caps) and
``admit`` (``Admission``: validation and the one script that admits and creates a job). Import from the modules."""
