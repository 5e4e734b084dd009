"""The record table Canal's DNS server answers from: rewritten Service names -> gateway addresses.

Pure and deterministic: built per desired state from `DesiredState.dns` (from the previous table when there is
one, reusing what unchanged records became), never mutated, swapped whole by the server. Lookups are by wire
labels (a tuple of bytes, as they arrive in a query), so a label that contains a dot or a non-ASCII byte can
never alias a record name; DNS names compare case-insensitively for ASCII only (RFC 4343), which is exactly what
`bytes.lower()` does.

The zone of a record (the owner of the SOA put in the authority section of NODATA answers) is the cluster
domain: the part after `<service>.<namespace>.svc.`, as in CoreDNS's kubernetes plugin, which is authoritative for
`cluster.local`. A name without that shape is its own zone. The SOA follows the same plugin: `ns.dns.<zone>`,
`hostmaster.<zone>`, refresh 7200, retry 1800, expire 86400; its minimum (the negative-caching TTL, RFC 2308) is
the record's own TTL and the SOA's TTL is min(TTL, 300), so a client that got NODATA asks again as soon as it
would ask again for the address. The serial is a hash of the table's content, the sum of per-record digests
(CoreDNS uses the time of the last change): Canal does no zone transfers, so the serial only has to change when
the records do, and stays reproducible.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

from canal.desired import DnsRecord

SOA_REFRESH = 7200
SOA_RETRY = 1800
SOA_EXPIRE = 86400
SOA_MAX_TTL = 300
MAX_TTL = 2**31 - 1  # RFC 2181 section 8
MAX_NAME_WIRE = 255  # RFC 1035 section 2.3.4, including the root label
MAX_LABEL = 63

Labels = tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Soa:
    """The zone apex record for NODATA answers (RFC 2308: negative answers carry the zone's SOA). The serial is
    the table's (`RecordTable.serial`), so entries that did not change can be kept across tables."""

    zone: str  # lower case, no trailing dot
    mname: str
    rname: str
    refresh: int
    retry: int
    expire: int
    minimum: int
    ttl: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One rewritten name: its gateway addresses split by family, the TTL, and the SOA for other types."""

    name: str  # lower case, no trailing dot
    a: tuple[str, ...]
    aaaa: tuple[str, ...]
    ttl: int
    gateway: str  # namespace/name of the owning InternalGateway
    soa: Soa


@dataclass(frozen=True, slots=True)
class Built:
    """What one DnsRecord became, kept so the next table can reuse it while the same record object comes back
    (the desired state's persistent maps keep unchanged records identical)."""

    record: DnsRecord
    labels: Labels | None  # the entry's key; None when the record is not served
    entry: Entry | None
    problems: tuple[str, ...]
    digest: int  # the record's share of the table serial


@dataclass(frozen=True, slots=True)
class RecordTable:
    """Immutable: the server swaps whole tables, so a query sees one consistent version."""

    entries: Mapping[Labels, Entry] = field(default_factory=lambda: MappingProxyType({}))
    serial: int = 0
    problems: tuple[str, ...] = ()  # records that could not be served, with the reason (errors as values)
    built: Mapping[str, Built] = field(default_factory=lambda: MappingProxyType({}), repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup_labels(self, labels: Labels) -> Entry | None:
        """The entry for a name given as wire labels, any ASCII case."""
        return self.entries.get(tuple(label.lower() for label in labels))

    def lookup(self, name: str) -> Entry | None:
        """The entry for a presentation-format name: any case, with or without the trailing dot."""
        labels = name_labels(name)
        return None if labels is None else self.entries.get(labels)

    def names(self) -> list[str]:
        return sorted(e.name for e in self.entries.values())


EMPTY_TABLE = RecordTable()


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalize(name: str) -> str:
    """The table's spelling of a name: lower case (ASCII letters only, as DNS compares), no trailing dot."""
    name = name[:-1] if name.endswith(".") else name
    return name.lower() if name.isascii() else name.translate(_ASCII_LOWER)


def name_labels(name: str) -> Labels | None:
    """Wire labels of a presentation-format name (lower-cased), or None if it is not a valid DNS name."""
    return _labels(normalize(name))


def _labels(normalized: str) -> Labels | None:
    if not normalized.isascii():
        return None
    raw = normalized.encode("ascii")
    if not raw:
        return ()
    labels = tuple(raw.split(b"."))
    if any(not label or len(label) > MAX_LABEL for label in labels):
        return None
    if sum(len(label) + 1 for label in labels) + 1 > MAX_NAME_WIRE:
        return None
    return labels


def zone_of(fqdn: str) -> str:
    """The cluster domain of `<svc>.<ns>.svc.<domain>`; any other name is its own zone."""
    normalized = normalize(fqdn)
    parts = normalized.split(".", 3)
    if len(parts) == 4 and parts[2] == "svc":
        return parts[3]
    return normalized


def record_digest(record: DnsRecord, normalized: str | None = None) -> int:
    """A 32-bit hash of what a record serves (name, addresses, TTL, owner)."""
    name = normalize(record.fqdn) if normalized is None else normalized
    line = f"{name} {','.join(sorted(record.addresses))} {record.ttl} {record.gateway}"
    return zlib.crc32(line.encode("utf-8", "backslashreplace"))


def table_serial(records: Mapping[str, DnsRecord]) -> int:
    """A 32-bit content hash: the sum of the records' digests, so equal for equal record sets in any order, and
    updated per changed record."""
    return sum(record_digest(r) for r in records.values()) & 0xFFFFFFFF


@lru_cache(maxsize=1024)
def soa_for(zone: str, ttl: int) -> Soa:
    return Soa(
        zone=zone,
        mname=f"ns.dns.{zone}" if zone else "ns.dns",
        rname=f"hostmaster.{zone}" if zone else "hostmaster",
        refresh=SOA_REFRESH,
        retry=SOA_RETRY,
        expire=SOA_EXPIRE,
        minimum=ttl,
        ttl=min(ttl, SOA_MAX_TTL),
    )


@lru_cache(maxsize=4096)
def split_addresses(addresses: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(IPv4, IPv6, invalid): each family sorted numerically and deduplicated, in canonical text. Cached: every
    name of a gateway shares the same addresses."""
    v4: set[ipaddress.IPv4Address] = set()
    v6: set[ipaddress.IPv6Address] = set()
    bad: list[str] = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            bad.append(text)
            continue
        (v4 if address.version == 4 else v6).add(address)  # type: ignore[arg-type]
    return tuple(str(a) for a in sorted(v4)), tuple(str(a) for a in sorted(v6)), tuple(bad)


def build_record(record: DnsRecord) -> Built:
    name = normalize(record.fqdn)
    digest = record_digest(record, name)
    labels = _labels(name)
    if not labels:
        return Built(record, None, None, (f"{record.fqdn!r}: not a valid DNS name",), digest)
    v4, v6, bad = split_addresses(tuple(record.addresses))
    problems = tuple(f"{record.fqdn}: {text!r} is not an IP address" for text in bad)
    if not v4 and not v6:
        return Built(record, None, None, (*problems, f"{record.fqdn}: no usable address"), digest)
    ttl = min(max(record.ttl, 0), MAX_TTL)
    entry = Entry(name=name, a=v4, aaaa=v6, ttl=ttl, gateway=record.gateway, soa=soa_for(zone_of(name), ttl))
    return Built(record, labels, entry, problems, digest)


def build_table(records: Mapping[str, DnsRecord], previous: RecordTable | None = None) -> RecordTable:
    """The table for a desired state's DNS records. Every record is served whatever its `mode`: the mode says
    which publisher a cluster uses, and `canal run` serves them all. Unservable records (a bad name or address)
    are left out and listed in `problems`; of two records whose names differ only in case, the one with the
    smaller spelling is served. With `previous`, the work done for records that are the very same objects as
    then is reused: an update costs one pass over the mapping plus the changed records."""
    before = previous.built if previous is not None else {}
    built: dict[str, Built] = {}
    entries: dict[Labels, Entry] = {}
    owners: dict[Labels, str] = {}
    problems: list[str] = []
    serial = 0
    for key, record in records.items():
        done = before.get(key)
        if done is None or done.record is not record:
            done = build_record(record)
        built[key] = done
        serial += done.digest
        problems.extend(done.problems)
        if done.labels is None or done.entry is None:
            continue
        other = owners.get(done.labels)
        if other is not None:
            loser = max(other, record.fqdn)
            problems.append(f"{loser}: defined twice (names are case-insensitive); {min(other, record.fqdn)} is served")
            if record.fqdn > other:
                continue
        owners[done.labels] = record.fqdn
        entries[done.labels] = done.entry
    return RecordTable(
        entries=MappingProxyType(entries),
        serial=serial & 0xFFFFFFFF,
        problems=tuple(sorted(problems)),
        built=MappingProxyType(built),
    )
