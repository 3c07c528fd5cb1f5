"""A Pinecone data-plane stand-in served on loopback, for driving the real ``pinecone`` client in tests.

Implements the five REST calls the product uses, with exact (brute-force) cosine search and Pinecone's
metadata filter operators, evaluated here by an implementation of its own so the contract tests compare two
independent readings of the same semantics. Faults can be injected: statuses for the next requests, a
delay on every request.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np


def _passes(flt: dict[str, Any], meta: dict[str, Any]) -> bool:
    results = []
    for key, cond in flt.items():
        if key in ("$and", "$or"):
            parts = [_passes(sub, meta) for sub in cond]
            results.append(all(parts) if key == "$and" else any(parts))
            continue
        if not isinstance(cond, dict):
            cond = {"$eq": cond}
        present, value = key in meta, meta.get(key)
        for op, arg in cond.items():
            if op == "$ne":
                ok = not present or value != arg
            elif op == "$nin":
                ok = not present or value not in arg
            elif not present:
                ok = False
            elif op == "$eq":
                ok = value == arg
            elif op == "$in":
                ok = value in arg
            else:
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                ok = numeric and {"$gt": value > arg, "$gte": value >= arg, "$lt": value < arg,
                                  "$lte": value <= arg}[op]
            results.append(bool(ok))
    return all(results)


_RANGE = ("$gt", "$gte", "$lt", "$lte")


def _kind(v: Any) -> str:
    """A JSON value's type as Pinecone's documentation names them."""
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number" if v == v and abs(v) != float("inf") else "not-a-number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), "null")


def _refusal(flt: Any, depth: int = 0) -> str | None:
    """Why Pinecone would answer 400 to this filter (its documented value types per operator: $eq/$ne string,
    number, boolean; ranges number; $in/$nin an array of strings or numbers), or None. Written apart from
    pipeline.filters on purpose: a contract test compares the two readings."""
    if _kind(flt) != "object" or depth > 10:
        return "a filter is an object"
    for key, cond in flt.items():
        if key in ("$and", "$or"):
            if _kind(cond) != "array" or not cond:
                return f"{key} takes a non-empty array"
            for sub in cond:
                if why := _refusal(sub, depth + 1):
                    return why
            continue
        if key.startswith("$"):
            return f"unknown operator {key}"
        ops = cond if _kind(cond) == "object" else {"$eq": cond}
        if not ops:
            return f"an empty condition on {key}"
        for op, arg in ops.items():
            if op in ("$eq", "$ne"):
                allowed = _kind(arg) in ("string", "number", "boolean")
            elif op in _RANGE:
                allowed = _kind(arg) == "number"
            elif op in ("$in", "$nin"):
                allowed = _kind(arg) == "array" and all(_kind(x) in ("string", "number") for x in arg)
            else:
                return f"unknown operator {op}"
            if not allowed:
                return f"{op} on {key} does not take {_kind(arg)} {arg!r}"[:200]
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away (tests do that)
            super().handle_error(request, client_address)


class PineconeStandIn:
    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.data: dict[str, dict[str, tuple[np.ndarray, dict[str, Any]]]] = {}
        self.lock = threading.Lock()
        self.fail_next: list[int] = []  # statuses to answer the next requests with
        self.fail_path: dict[str, list[int]] = {}  # ...and the next requests to one path (e.g. "/query")
        self.delay_s = 0.0
        self.upserts: dict[str, int] = {}  # "namespace/id" -> times upserted (a test counts writes redone)
        self.requests: list[tuple[str, str]] = []
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> PineconeStandIn:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- the API ---
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> tuple[int, Any]:
        ns_name = body.get("namespace", (query.get("namespace") or [""])[0]) or ""
        with self.lock:
            ns = self.data.setdefault(ns_name, {})
            if path == "/vectors/upsert":
                for v in body["vectors"]:
                    ns[v["id"]] = (np.asarray(v["values"], np.float32), v.get("metadata") or {})
                    key = f"{ns_name}/{v['id']}"
                    self.upserts[key] = self.upserts.get(key, 0) + 1
                return 200, {"upsertedCount": len(body["vectors"])}
            if path in ("/query", "/vectors/delete") and body.get("filter") is not None and _refusal(body["filter"]):
                return 400, {"code": 3, "message": f"Invalid filter: {_refusal(body['filter'])}"}
            if path == "/query":
                q = np.asarray(body["vector"], np.float32)
                q = q / (np.linalg.norm(q) or 1.0)
                flt = body.get("filter") or {}
                scored = []
                for vid, (vec, meta) in ns.items():
                    if _passes(flt, meta):
                        scored.append((float(vec @ q / (np.linalg.norm(vec) or 1.0)), vid))
                scored.sort(key=lambda t: -t[0])
                matches = [{"id": vid, "score": s, **({"metadata": ns[vid][1]} if body.get("includeMetadata") else {}),
                            **({"values": ns[vid][0].tolist()} if body.get("includeValues") else {})}
                           for s, vid in scored[: body["topK"]]]
                return 200, {"matches": matches, "namespace": ns_name}
            if path == "/vectors/fetch":
                ids = query.get("ids", [])
                return 200, {"vectors": {i: {"id": i, "values": ns[i][0].tolist(), "metadata": ns[i][1]}
                                         for i in ids if i in ns}, "namespace": ns_name}
            if path == "/vectors/delete":
                if body.get("deleteAll"):
                    ns.clear()
                elif "ids" in body:
                    for i in body["ids"]:
                        ns.pop(i, None)
                elif "filter" in body:
                    for i in [i for i, (_, m) in ns.items() if _passes(body["filter"], m)]:
                        del ns[i]
                return 200, {}
            if path == "/describe_index_stats":
                dims = {len(v) for n in self.data.values() for v, _ in n.values()}
                return 200, {"namespaces": {k: {"vectorCount": len(v)} for k, v in self.data.items() if v},
                             "dimension": dims.pop() if len(dims) == 1 else None, "indexFullness": 0.0,
                             "totalVectorCount": sum(len(v) for v in self.data.values())}
        return 404, {"code": 5, "message": f"not found: {path}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def _serve(self) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                standin.requests.append((self.command, url.path))
                if standin.delay_s:
                    time.sleep(standin.delay_s)
                if self.headers.get("Api-Key") != standin.api_key:
                    status, payload = 401, {"code": 16, "message": "invalid api key"}
                elif standin.fail_next or standin.fail_path.get(url.path):
                    status = (standin.fail_next or standin.fail_path[url.path]).pop(0)
                    payload = {"code": 3 if status == 400 else 8, "message": f"injected {status}"}
                else:
                    status, payload = standin.handle(self.command, url.path, parse_qs(url.query),
                                                     json.loads(raw) if raw else {})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

        return Handler
