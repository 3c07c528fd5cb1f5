"""Who a request came from, as its limits count it: the peer's address, or behind a trusted proxy the right-most
address of X-Forwarded-For that is not one of ours (what a client writes to the left of it is not believed).
Input from the network: every entry is parsed, and anything that is no address ends the walk."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(specs: Iterable[str]) -> list[Network]:
    """Trusted proxies' networks; a v4-mapped IPv6 one (``::ffff:10.0.0.0/104``) as the IPv4 one it names, since
    addresses are unmapped before they are matched."""
    out: list[Network] = []
    for spec in specs:
        net = ipaddress.ip_network(spec, strict=False)
        mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
        out.append(ipaddress.IPv4Network((mapped, net.prefixlen - 96)) if mapped and net.prefixlen >= 96 else net)
    return out


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IP | None:
    """One address as a peer or an X-Forwarded-For entry gives it, or None for anything that is not one: a port
    is stripped (``1.2.3.4:5678``, ``[2001:db8::1]:443``) and so is an IPv6 zone, and a v4-mapped IPv6 address
    (``::ffff:1.2.3.4``) is the IPv4 address it carries."""
    s = text.strip()
    if s.startswith("["):  # [v6] or [v6]:port
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        s = host
    elif s.count(":") == 1:  # v4:port (a bare v6 address holds two colons or more)
        s, _, port = s.partition(":")
        if not port.isdigit():
            return None
    try:
        ip = ipaddress.ip_address(s.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def bucket_of(ip: IP) -> str:
    """What one client's limits count against: an IPv4 address, or an IPv6 address's /64 (a host usually holds a
    whole /64, so one bucket per address would give it 2**64 of them)."""
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def client_address(peer: str, forwarded_for: str | Iterable[str], trusted: list[Network]) -> str:
    """The client's address, as its limits' bucket (``bucket_of``): the peer's; behind a trusted proxy, the
    right-most address of X-Forwarded-For (every line of it, in order) that is not itself a trusted proxy, as is
    standard: what a client writes to the left of it is not believed. An entry that is no address ends the walk
    at the peer (a proxy of ours never writes one)."""
    ip = parse_address(peer)
    if ip is None:
        return peer[:64] or "unknown"  # no IP peer (a unix socket): nothing better to tell callers apart by

    def is_trusted(addr: IP) -> bool:
        return any(addr in net for net in trusted)

    if not is_trusted(ip):
        return bucket_of(ip)
    lines = [forwarded_for] if isinstance(forwarded_for, str) else list(forwarded_for)
    chain = [a for line in lines for a in line.split(",") if a.strip()]
    last = ip
    for entry in reversed(chain):
        addr = parse_address(entry)
        if addr is None:
            return bucket_of(ip)
        if not is_trusted(addr):
            return bucket_of(addr)
        last = addr  # every hop so far is ours: the left-most of them, if nothing else is left
    return bucket_of(last)
