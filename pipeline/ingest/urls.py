"""Which URLs from a listing ingest may fetch: http(s) only, on an allowed host, at an address that is public
(or in a network a setting allows). Checked when a listing is read and again for every hop a download takes,
and the download connects to the address that was checked (so a name that resolves elsewhere a moment later
gains nothing)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(ValueError):
    """A URL ingest will not fetch; the message says why (and is safe to store: bounded, escaped)."""


def shown(url: str, limit: int = 120) -> str:
    """A URL as it may appear in a reason: escaped, cut short."""
    return ascii(url[:limit] + ("..." if len(url) > limit else ""))


def check_form(url: str, hosts: Collection[str]) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL on one of ``hosts``, or Refused. No address is looked up."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Refused(f"URL {shown(url)} refused: not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused(f"URL {shown(url)} refused: {'scheme ' + ascii(scheme) if scheme else 'no scheme'} "
                      "(only http and https are fetched)")
    if parts.username is not None or parts.password is not None:
        raise Refused(f"URL {shown(url)} refused: it carries credentials")
    host = (parts.hostname or "").lower().rstrip(".")
    if host not in {h.lower() for h in hosts}:
        raise Refused(f"URL {shown(url)} refused: host {ascii(host)} is not an allowed image host")
    return scheme, host, port or (443 if scheme == "https" else 80)


def _kind(ip: IPAddress) -> str | None:
    """What makes ``ip`` no public address, or None if it is one."""
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved", "site_local"):
        if getattr(ip, f"is_{kind}", False):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"


@dataclass(frozen=True)
class Target:
    """A checked hop: where to connect (``address``) and what to ask for there."""

    url: str  # as the listing or the redirect gave it
    host: str
    port: int
    address: str

    @property
    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address (the Host header and TLS keep the name)."""
        parts = urlsplit(self.url)
        literal = f"[{self.address}]" if ":" in self.address else self.address
        return urlunsplit((parts.scheme, f"{literal}:{self.port}", parts.path or "/", parts.query, ""))

    @property
    def host_header(self) -> str:
        default = 443 if self.url.lower().startswith("https:") else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


class UrlGuard:
    """Checks a URL's form, then every address its host resolves to: loopback, private, link-local, multicast,
    unspecified and other non-public addresses are refused unless inside ``allow`` (e.g. a test's stand-in
    on 127.0.0.1/32; keep it as narrow as that)."""

    def __init__(self, hosts: Collection[str], allow: Sequence[str] = ()) -> None:
        self.hosts = frozenset(h.lower() for h in hosts)
        self.allow: list[IPNetwork] = [ipaddress.ip_network(n, strict=False) for n in allow]

    def address_ok(self, ip: IPAddress) -> str | None:
        """None if ``ip`` may be fetched from, else what kind of address it is."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if any(ip in net for net in self.allow):
            return None
        return _kind(ip)

    def check(self, url: str) -> Target:
        """The hop to take for ``url``, or Refused naming what is wrong with it."""
        _, host, port = check_form(url, self.hosts)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise Refused(f"URL {shown(url)} refused: host {ascii(host)} does not resolve ({exc})") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for a in addresses:  # every one: a name that also resolves to an internal address is refused outright
            kind = self.address_ok(ipaddress.ip_address(a.split("%", 1)[0]))
            if kind is not None:
                raise Refused(f"URL {shown(url)} refused: {ascii(host)} resolves to {a}, a {kind} address")
        if not addresses:
            raise Refused(f"URL {shown(url)} refused: host {ascii(host)} has no address")
        return Target(url, host, port, addresses[0])
