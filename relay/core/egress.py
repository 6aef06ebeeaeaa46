"""Where the relay may connect on a client's word (reference images it downloads, client hooks it calls) or on an
upstream's (the images of finished jobs, at hosts other than the provider's own: `address`).

A client-given URL must be http(s), and every address its host resolves to must be public (not private, loopback,
link-local, multicast, reserved, nor such an address carried inside an IPv6 form), unless `allow_private` is set
or the host (by name or CIDR block) is in `allow_hosts`. The connection then goes to the address that was checked,
with the URL's Host header, TLS server name and credentials (basic auth), so a name cannot resolve to one address
for the check and another for the connection. Each hop of a redirect is checked again by its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class EgressRefused(Exception):
    """The URL may not be reached; the message says why, in words for the client."""


@dataclass(frozen=True, slots=True)
class Pinned:
    """Where to connect for a checked URL."""

    target: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


def pinned_client(timeout_s: float, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """An HTTP client for pinned connections: a fresh connection for every request (a pooled one, made for another
    host name on the same address, would skip that host's TLS name check), no redirects followed (each hop is
    checked by its caller), and no proxies from the environment (they would connect by name)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_keepalive_connections=0),
        follow_redirects=False,
        trust_env=False,
        transport=transport,
    )


# A client-given name is looked up for at most this long (waiting for a free lookup thread included), then refused.
LOOKUP_TIMEOUT_S = 5.0
# Lookups of client-given names under way at once, each on a thread of its own (`Lookups`).
LOOKUP_THREADS = 8
# Lookups of one owner's (a key's) names under way at once: names whose servers never answer, sent by one key, hold
# at most this many of the threads, and the other keys' names are looked up on the rest.
LOOKUPS_PER_OWNER = 2


@dataclass(slots=True)
class _Owner:
    """One owner's lookups: the places they take, and how many lookups hold or wait for one."""

    slots: asyncio.Semaphore
    users: int = 0


class Egress:
    def __init__(
        self,
        allow_private: bool,
        allow_hosts: Sequence[str],
        resolver: Resolver | None = None,
        *,
        lookup_timeout_s: float = LOOKUP_TIMEOUT_S,
        lookups_per_owner: int = LOOKUPS_PER_OWNER,
    ) -> None:
        self.allow_private = allow_private
        self._resolve = resolver or Lookups(LOOKUP_THREADS).resolve
        self.lookup_timeout_s = lookup_timeout_s
        self.lookups_per_owner = lookups_per_owner
        self._owners: dict[str, _Owner] = {}
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._hosts: set[str] = set()
        for entry in allow_hosts:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._hosts.add(entry.lower())

    async def pin(self, url: str, *, owner: str) -> Pinned:
        """The checked place to connect for `url`, a URL `owner` (a key) gave; raises EgressRefused when it may
        not be reached."""
        try:
            parts = urlsplit(url)
            hostname = parts.hostname
            # What the HTTP client will send: it refuses a control character, an unpaired surrogate, a name that
            # is not valid IDNA, and gives the ASCII (IDNA) form of the host for the Host header.
            sendable = httpx.URL(url)
        except (ValueError, httpx.InvalidURL):  # an unclosed IPv6 bracket, and the like
            raise EgressRefused("it is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not hostname:
            raise EgressRefused("it must be an http(s) URL")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise EgressRefused("it has an invalid port") from None
        host = hostname.lower()
        if not host.isascii():
            # The name the HTTP client sends (IDNA 2008, in `Host`) is the one looked up and checked, and the TLS
            # server name: the system reads a name that is not ASCII as IDNA 2003, which maps some names to
            # another domain (`faß.de` is `xn--fa-hia.de`, not `fass.de`).
            host = sendable.raw_host.decode("ascii")
        if self.allow_private or host in self._hosts or hostname.lower() in self._hosts:
            # Sent as it is: the HTTP client decodes a host written as punycode as it sends, and one that decodes
            # to no name (`xn--zz`) fails there with an error that is no HTTP error (a 500, a client hook's watch
            # ended). A URL sent to the address checked names its host in the Host header only, as it is written.
            try:
                sendable.host  # noqa: B018 (decoded for its refusal)
            except ValueError:
                raise EgressRefused("it is not a valid URL") from None
            return Pinned(url)
        address = await self._checked(host, port, owner)
        literal = f"[{address}]" if address.version == 6 else str(address)
        # The URL's credentials stay with it (sent as basic auth, as to an unchecked URL), percent-encoded as
        # the HTTP client reads them: they can name no other host.
        userinfo = sendable.userinfo.decode("ascii")
        netloc = f"{userinfo}@{literal}:{port}" if userinfo else f"{literal}:{port}"
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        extensions: dict[str, Any] = {"sni_hostname": host} if parts.scheme == "https" else {}
        return Pinned(target, {"Host": sendable.netloc.decode("ascii")}, extensions)

    async def address(self, host: str, port: int, *, owner: str) -> str:
        """Where to connect for `host` (a name or an IP address, as an HTTP client names it) on `port`: an
        address it resolves to, checked as `pin` checks one, or the host itself when the rules allow it as it is;
        raises EgressRefused."""
        host = host.lower()
        if self.allow_private or host in self._hosts:
            return host
        return str(await self._checked(host, port, owner))

    async def _checked(self, host: str, port: int, owner: str) -> IPAddress:
        """The address to connect to for `host`: the first it resolves to, when every one is public or in an
        allowed block; raises EgressRefused."""
        try:
            async with asyncio.timeout(self.lookup_timeout_s):
                addresses = await self._resolve_for(owner, host, port)
        except TimeoutError:
            raise EgressRefused("its host did not resolve in time") from None
        except (OSError, UnicodeError):
            raise EgressRefused("its host does not resolve") from None
        if not addresses:
            raise EgressRefused("its host does not resolve")
        for address in addresses:
            if not any(address in network for network in self._networks) and not public(address):
                raise EgressRefused("it may not point at private or local addresses")
        return addresses[0]

    async def _resolve_for(self, owner: str, host: str, port: int) -> list[IPAddress]:
        """Look a name up as one of the owner's `lookups_per_owner`: the place is taken (waiting for one within
        the caller's time limit) and kept until the lookup returns, also when its caller stopped waiting, as the
        thread it holds is busy until then."""
        place = self._owners.setdefault(owner, _Owner(asyncio.Semaphore(self.lookups_per_owner)))
        place.users += 1
        try:
            await place.slots.acquire()
        except BaseException:
            self._leave(owner, place, holding=False)
            raise
        try:
            lookup = asyncio.ensure_future(self._resolve(host, port))
        except BaseException:
            self._leave(owner, place, holding=True)
            raise
        lookup.add_done_callback(lambda done: self._looked_up(owner, place, done))
        return await asyncio.shield(lookup)

    def _looked_up(self, owner: str, place: _Owner, lookup: asyncio.Future[list[IPAddress]]) -> None:
        if not lookup.cancelled():
            lookup.exception()  # retrieved here too: a caller that gave up leaves no warning
        self._leave(owner, place, holding=True)

    def _leave(self, owner: str, place: _Owner, *, holding: bool) -> None:
        if holding:
            place.slots.release()
        place.users -= 1
        if place.users == 0 and self._owners.get(owner) is place:
            del self._owners[owner]


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
# Blocks the IANA special-purpose registries mark not globally reachable, beyond what `ipaddress` flags (which
# varies with the Python version): listed so the answer does not.
_SPECIAL_V4 = tuple(
    ipaddress.IPv4Network(block)
    for block in (
        "0.0.0.0/8",  # this network
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
    )
)
_SPECIAL_V6 = tuple(
    ipaddress.IPv6Network(block)
    for block in (
        "2001::/23",  # IETF protocol assignments, Teredo among them
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing
    )
)


def _public_v4(address: ipaddress.IPv4Address) -> bool:
    if any(address in block for block in _SPECIAL_V4):
        return False
    flags = (address.is_private, address.is_reserved, address.is_multicast, address.is_loopback)
    return address.is_global and not any(flags) and not (address.is_link_local or address.is_unspecified)


def public(address: IPAddress) -> bool:
    """Whether an address is on the public internet. An IPv6 address is public only as a global unicast one
    (2000::/3, less its special blocks), or as a NAT64 one (64:ff9b::/96) whose IPv4 address is public: every
    other form that carries an IPv4 address (IPv4-mapped ::ffff:0:0/96, IPv4-compatible ::/96, IPv4-translated)
    lies outside 2000::/3 and is refused, and a 6to4 one (2002::/16) is public only if its IPv4 address is.
    Multicast, reserved, unspecified, loopback, link-local, site-local and private addresses never are."""
    if isinstance(address, ipaddress.IPv4Address):
        return _public_v4(address)
    if address in _NAT64:
        return _public_v4(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address not in _GLOBAL_UNICAST or any(address in block for block in _SPECIAL_V6):
        return False
    if address.sixtofour is not None and not _public_v4(address.sixtofour):
        return False
    flags = (address.is_private, address.is_reserved, address.is_multicast, address.is_loopback)
    return address.is_global and not any(flags) and not (address.is_link_local or address.is_site_local)


class Lookups:
    """Looks client-given host names up, each on a thread of its own, at most `threads` at once.

    A system lookup cannot be abandoned: one whose name servers never answer holds its thread until the system
    resolver gives up, which may take many seconds. On the event loop's own lookup threads (libuv's four, or
    asyncio's executor), a few such names from any client would hold up the relay's connections to its upstreams,
    which look their names up there too. Here they hold up only each other: a lookup that finds every thread
    busy waits for one (within the caller's time limit), and the threads never keep the process from exiting."""

    def __init__(self, threads: int) -> None:
        self._threads = asyncio.Semaphore(threads)

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address a host name resolves to (an IP literal resolves to itself, at once)."""
        if "%" not in host:  # a scoped IPv6 literal is the system's to read, as any name
            try:
                return [ipaddress.ip_address(host)]
            except ValueError:
                pass
        loop = asyncio.get_running_loop()
        await self._threads.acquire()  # released when the lookup returns, whoever still waits for it
        answer: asyncio.Future[list[Any]] = loop.create_future()

        def look_up() -> None:
            try:
                infos: list[Any] | BaseException = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except BaseException as exc:  # handed to the caller, if it still waits
                infos = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._answered, answer, infos)

        try:
            threading.Thread(target=look_up, name="egress-lookup", daemon=True).start()
        except BaseException:
            self._threads.release()
            raise
        infos = await asyncio.shield(answer)
        return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]

    def _answered(self, answer: asyncio.Future[list[Any]], infos: list[Any] | BaseException) -> None:
        self._threads.release()
        if answer.done():
            return
        if isinstance(infos, BaseException):
            answer.set_exception(infos)
            answer.exception()  # retrieved here too: a caller that gave up leaves no warning
        else:
            answer.set_result(infos)
