"""Which URLs from a listing ingest may fetch: http(s) only, on an allowed host and port (80 and 443 unless a setting
adds others), at an address that is public (or in a network a setting allows). Checked when a listing is read and
again for every hop a download takes, and the download connects to the address that was checked (so a name that
resolves elsewhere a moment later gains nothing)."""

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


DEFAULT_PORTS = (80, 443)

# IANA's special-purpose address registries (IPv4 and IPv6, as of 2024), each refused whatever its "globally
# reachable" column says: none is where an image host lives, and several reach inside (6to4 and NAT64 embed an
# IPv4 address a gateway may route to; 192.0.0.0/24 holds DS-Lite and NAT64 discovery). Loopback, private,
# link-local, multicast and the rest that ``ipaddress`` knows are refused by kind besides.
SPECIAL = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24", "192.88.99.0/24", "192.168.0.0/16", "192.175.48.0/24",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "2002::/16", "2620:4f:8000::/48", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10"))
_NAMES = {"2002::/16": "6to4", "64:ff9b::/96": "NAT64", "64:ff9b:1::/48": "NAT64", "2001::/23": "IETF protocol"}


def check_form(url: str, hosts: Collection[str], ports: Collection[int] = DEFAULT_PORTS) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL on one of ``hosts`` and ``ports``, or Refused. No address is looked
    up."""
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
    port = port or (443 if scheme == "https" else 80)
    if port not in ports:
        raise Refused(f"URL {shown(url)} refused: port {port} (only {', '.join(map(str, sorted(ports)))} are fetched)")
    return scheme, host, port


def _kind(ip: IPAddress) -> str | None:
    """What makes ``ip`` no public address, or None if it is one."""
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved", "site_local"):
        if getattr(ip, f"is_{kind}", False):
            return kind.replace("_", "-")
    for net in SPECIAL:
        if ip.version == net.version and ip in net:
            return f"special-purpose ({_NAMES.get(str(net), str(net))})"
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
    """Checks a URL's form (scheme, host, one of ``ports``), then every address its host resolves to: loopback,
    private, link-local, multicast, unspecified, IANA's special-purpose ranges (6to4 and NAT64 included) and other
    non-public addresses are refused unless inside ``allow`` (e.g. a test's stand-in on 127.0.0.1/32; keep it as
    narrow as that)."""

    def __init__(self, hosts: Collection[str], allow: Sequence[str] = (), ports: Collection[int] = DEFAULT_PORTS) -> None:
        self.hosts = frozenset(h.lower() for h in hosts)
        self.ports = frozenset(ports)
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
        _, host, port = check_form(url, self.hosts, self.ports)
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
