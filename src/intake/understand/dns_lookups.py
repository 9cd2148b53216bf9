"""DNS TXT lookups for sender authentication: the real resolver (cached, bounded), a batch's time budget, a stub.

Answers are cached per process (:class:`DnsResolver`, bounded, TTL-limited), and so are timeouts
and failures, for a few minutes: a slow name server costs one timeout per name. A processing
batch spends at most :func:`batch_dns_seconds` on lookups (:class:`TimeBudget`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from intake.config.sections import SenderAuthSection


class Resolver(Protocol):
    """The DNS lookups sender authentication needs (dnspython in service, a stub in tests)."""

    def txt(self, name: str) -> list[bytes]:
        """The TXT strings of *name*, each record's strings joined; [] when it has none.
        Raises ``TimeoutError`` (or ``OSError``) when the lookup could not be answered."""
        ...


class StaticResolver:
    """Fixed TXT records, for tests: ``{name: [record, ...]}``; a value of ``TimeoutError`` (the
    class) makes that lookup time out. ``lookups`` lists every name asked for."""

    def __init__(self, records: dict[str, Any] | None = None) -> None:
        self.records: dict[str, Any] = dict(records or {})
        self.lookups: list[str] = []

    def txt(self, name: str) -> list[bytes]:
        self.lookups.append(name)
        found = self.records.get(name.lower().rstrip("."), [])
        if found is TimeoutError:
            raise TimeoutError(f"{name}: no answer (stub)")
        return [r.encode() if isinstance(r, str) else bytes(r) for r in found]


# Seconds a name whose lookup timed out or failed is not asked again (its failure is the answer).
_FAILURE_TTL = 300.0


class DnsResolver:
    """TXT lookups with dnspython: within *timeout*, no search domains, answers (and
    non-existence) cached per process up to their TTL, at most ``max_ttl`` seconds, and a timeout
    or failure for ``_FAILURE_TTL`` seconds (a slow name server costs one timeout per name, not
    one per message). The system's name servers (/etc/resolv.conf), or *nameservers* on *port*."""

    def __init__(self, timeout: float, max_entries: int = 1024, max_ttl: float = 300,
                 nameservers: list[str] | None = None, port: int = 53) -> None:
        self.timeout, self.max_entries, self.max_ttl = timeout, max_entries, max_ttl
        self.nameservers, self.port = nameservers, port
        self._cache: OrderedDict[str, tuple[float, list[bytes]]] = OrderedDict()
        self._lock = threading.Lock()
        self._resolver: Any = None

    def txt(self, name: str) -> list[bytes]:
        import dns.exception
        import dns.resolver

        key = name.lower().rstrip(".")
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
            if cached and cached[0] > now:
                self._cache.move_to_end(key)
                if isinstance(cached[1], Exception):
                    raise cached[1]
                return cached[1]
        try:
            if self._resolver is None:
                self._resolver = dns.resolver.Resolver(configure=self.nameservers is None)
                if self.nameservers is not None:
                    self._resolver.nameservers, self._resolver.port = self.nameservers, self.port
            answer = self._resolver.resolve(key + ".", "TXT", lifetime=self.timeout, search=False)
            records = [b"".join(rdata.strings) for rdata in answer]
            ttl = min(float(answer.rrset.ttl), self.max_ttl)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            records, ttl = [], min(60.0, self.max_ttl)
        except dns.exception.Timeout:
            self._remember(key, now + _FAILURE_TTL, TimeoutError(f"{key}: no answer within {self.timeout:g} s"))
            raise self._cache[key][1] from None  # type: ignore[misc]
        except dns.exception.DNSException as exc:
            self._remember(key, now + _FAILURE_TTL, OSError(f"{key}: {type(exc).__name__}"))
            raise self._cache[key][1] from None  # type: ignore[misc]
        self._remember(key, now + ttl, records)
        return records

    def _remember(self, key: str, until: float, answer: list[bytes] | Exception) -> None:
        with self._lock:
            self._cache[key] = (until, answer)  # type: ignore[assignment]
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)


class TimeBudget:
    """A resolver that stops asking once *seconds* of lookups are spent: one processing batch's
    DNS time. A sender whose domain's name server answers slowly (their own, if they reported
    from it) otherwise costs every message they send ``max_dns_lookups`` x ``dns_timeout``, and
    every other sender's mail waits behind it; past the budget a lookup is a ``temperror`` at once
    (a maintainer's mail is then refused, as with any DNS failure, until their next try)."""

    def __init__(self, resolver: Resolver, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._resolver, self.left, self._clock = resolver, seconds, clock

    def txt(self, name: str) -> list[bytes]:
        if self.left <= 0:
            raise TimeoutError(f"{name}: not looked up, this batch's DNS time is spent")
        started = self._clock()
        try:
            return self._resolver.txt(name)
        finally:
            self.left -= self._clock() - started


def batch_dns_seconds(config: SenderAuthSection) -> float:
    """DNS time one processing batch may spend: twice one message's worst case."""
    return 2 * config.dns_timeout * config.max_dns_lookups


def dns_resolver(timeout: float) -> DnsResolver:
    """A real resolver (the system's name servers) with *timeout* seconds per lookup."""
    return DnsResolver(timeout)


_system_resolvers: dict[float, DnsResolver] = {}


def system_resolver(config: SenderAuthSection) -> Resolver:
    """This process's resolver for *config* (shared, so its cache is). Tests replace this function
    (tests/conftest.py does, for every test) so that no test can reach real DNS."""
    if config.dns_timeout not in _system_resolvers:
        _system_resolvers[config.dns_timeout] = dns_resolver(config.dns_timeout)
    return _system_resolvers[config.dns_timeout]

