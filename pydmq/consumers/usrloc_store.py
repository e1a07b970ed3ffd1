"""The location table (Kamailio's usrloc ``udomain_t``), sans-I/O.

Every method that depends on time takes ``now`` (epoch seconds, as Kamailio's ``act_time``);
nothing here reads a clock, starts a task or sends anything. The replication rules live in
:mod:`pydmq.consumers.usrloc`; this module only says what changed.

Layout and order follow usrloc so that ``ul.dump`` lists records like Kamailio: records sit in
``hash_size`` slots by ``core_hash(aor) & (size - 1)``, appended per slot; the contacts of a
record are kept ordered by ``q``, highest first, a newcomer going after the contacts with the
same ``q`` (usrloc's default ``desc_time_order = 0``).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from enum import Enum

from pydmq.consumers.usrloc_codec import Contact

__all__ = ["DEFAULT_HASH_SIZE", "ApplyResult", "LocationStore", "Record", "core_hash"]

#: usrloc's default ``hash_size`` 10, i.e. 2**10 slots (``Size`` in ``ul.dump``).
DEFAULT_HASH_SIZE = 1024

_M32 = 0xFFFFFFFF


def core_hash(text: str) -> int:
    """Kamailio's ``core_hash(s, NULL, 0)`` (``HashID`` in ``ul.dump``, ``ul_get_aorhash``).

    Bytes are read as C ``char``, which is signed on the platforms Kamailio is packaged for.
    """
    data = text.encode("utf-8", "surrogateescape")
    signed = [b - 256 if b > 127 else b for b in data]
    h = 0
    n = len(signed)
    p = 0
    while p <= n - 4:
        v = (
            (signed[p] << 24) + (signed[p + 1] << 16) + (signed[p + 2] << 8) + signed[p + 3]
        ) & _M32
        h = (h + (v ^ (v >> 3))) & _M32
        p += 4
    v = 0
    while p < n:
        v = ((v << 8) + signed[p]) & _M32
        p += 1
    h = (h + (v ^ (v >> 3))) & _M32
    return ((h + (h >> 11)) + ((h >> 13) + (h >> 23))) & _M32


class ApplyResult(Enum):
    """What a replicated change did to the table."""

    INSERTED = "inserted"
    UPDATED = "updated"
    REMOVED = "removed"
    #: UPDATE/RM older (``last_modified``) than what is stored: skipped.
    STALE = "stale"
    #: UPDATE matched by contact and Call-ID with a CSeq not above the stored one (Kamailio:
    #: "Invalid cseq", or a duplicate): skipped.
    OLD_CSEQ = "old_cseq"
    #: RM of a contact that is not there: nothing to do.
    NOT_FOUND = "not_found"


@dataclass(slots=True)
class Record:
    """An address of record and its contacts (usrloc's ``urecord_t``)."""

    aor: str
    aorhash: int
    seq: int
    contacts: list[Contact] = field(default_factory=list)


class LocationStore:
    """One usrloc domain (table), e.g. ``location``."""

    def __init__(self, domain: str = "location", hash_size: int = DEFAULT_HASH_SIZE) -> None:
        if hash_size < 1 or hash_size & (hash_size - 1):
            raise ValueError("hash_size must be a power of two")
        self.domain = domain
        self.hash_size = hash_size
        self._records: dict[str, Record] = {}
        self._ruids: dict[str, str] = {}  # ruid -> aor
        self._seq = itertools.count()

    # -- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of contacts (expired ones included until :meth:`expire` removes them)."""
        return sum(len(r.contacts) for r in self._records.values())

    def __contains__(self, aor: object) -> bool:
        return aor in self._records

    @property
    def record_count(self) -> int:
        return len(self._records)

    def get(self, aor: str) -> list[Contact]:
        """Every contact of ``aor``, expired ones included (empty when unknown)."""
        record = self._records.get(aor)
        return list(record.contacts) if record else []

    def lookup(self, aor: str, now: float) -> list[Contact]:
        """The contacts of ``aor`` still valid at ``now``, in usrloc's order."""
        return [c for c in self.get(aor) if c.is_valid(now)]

    def by_ruid(self, ruid: str) -> Contact | None:
        aor = self._ruids.get(ruid)
        if aor is None:
            return None
        return self._find_ruid(self._records[aor], ruid)

    def records(self) -> list[Record]:
        """Records in ``ul.dump`` order: by hash slot, then by insertion into the slot.

        The records are copies; changing them does not change the table.
        """
        mask = self.hash_size - 1
        ordered = sorted(self._records.values(), key=lambda r: (r.aorhash & mask, r.seq))
        return [dataclasses.replace(r, contacts=list(r.contacts)) for r in ordered]

    def slot_stats(self) -> tuple[int, int]:
        """``(records, most records in one slot)``: ``Records`` and ``Max-Slots`` of ul.dump."""
        mask = self.hash_size - 1
        per_slot: dict[int, int] = {}
        for r in self._records.values():
            per_slot[r.aorhash & mask] = per_slot.get(r.aorhash & mask, 0) + 1
        return len(self._records), max(per_slot.values(), default=0)

    def contacts(self) -> list[Contact]:
        """Every contact, in ``ul.dump`` order (a snapshot list)."""
        return [c for r in self.records() for c in r.contacts]

    # -- local changes (what registrar's save() does) ----------------------------------------
    def save(self, contact: Contact) -> tuple[Contact | None, Contact]:
        """Insert ``contact``, or replace the contact of its AoR with the same URI.

        Returns ``(previous or None, stored)``. A replaced contact keeps its ``ruid`` when
        ``contact.ruid`` is empty.
        """
        record = self._records.get(contact.aor)
        if record is not None:
            old = _find_uri(record, contact.uri)
            if old is not None:
                if not contact.ruid:
                    contact = dataclasses.replace(contact, ruid=old.ruid)
                self._replace(record, old, contact)
                return old, contact
        self._insert(contact)
        return None, contact

    def remove(self, aor: str, uri: str | None = None) -> list[Contact]:
        """Delete every contact of ``aor`` (or only the one whose URI is ``uri``)."""
        record = self._records.get(aor)
        if record is None:
            return []
        gone = [c for c in record.contacts if uri is None or c.uri == uri]
        for c in gone:
            self._delete(record, c)
        return gone

    def expire(self, now: float) -> list[Contact]:
        """Delete the contacts that are no longer valid at ``now`` (usrloc's timer)."""
        gone: list[Contact] = []
        for record in list(self._records.values()):
            for c in [c for c in record.contacts if not c.is_valid(now)]:
                self._delete(record, c)
                gone.append(c)
        return gone

    # -- replicated changes (dmq_usrloc's add_contact / delete_contact) ----------------------
    def apply_update(self, contact: Contact) -> ApplyResult:
        """A received UPDATE.

        Kamailio 5.6.3 first looks the contact up by ``ruid`` (within the AoR) and overwrites
        it; failing that it matches by contact URI in the AoR (a match with the same Call-ID
        and a CSeq not above the stored one is skipped), and otherwise inserts. pydmq adds one
        rule from Kamailio master: a change whose ``last_modified`` is older than the stored
        contact's is skipped, so a late retransmission cannot roll a contact back.
        """
        record = self._records.get(contact.aor)
        if record is not None and contact.ruid:
            old = self._find_ruid(record, contact.ruid)
            if old is not None:
                if contact.last_modified < old.last_modified:
                    return ApplyResult.STALE
                self._replace(record, old, contact)
                return ApplyResult.UPDATED
        if record is not None:
            old = _find_uri(record, contact.uri)
            if old is not None:
                if old.callid == contact.callid and contact.cseq <= old.cseq:
                    return ApplyResult.OLD_CSEQ
                if contact.last_modified < old.last_modified:
                    return ApplyResult.STALE
                self._replace(record, old, contact)
                return ApplyResult.UPDATED
        self._insert(contact)
        return ApplyResult.INSERTED

    def apply_remove(self, contact: Contact) -> ApplyResult:
        """A received RM: delete the contact of ``contact.aor`` with ``contact.ruid``."""
        record = self._records.get(contact.aor)
        old = self._find_ruid(record, contact.ruid) if record and contact.ruid else None
        if record is None or old is None:
            return ApplyResult.NOT_FOUND
        if contact.last_modified < old.last_modified:
            return ApplyResult.STALE
        self._delete(record, old)
        return ApplyResult.REMOVED

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _find_ruid(record: Record, ruid: str) -> Contact | None:
        for c in record.contacts:
            if c.ruid == ruid:
                return c
        return None

    def _insert(self, contact: Contact) -> None:
        record = self._records.get(contact.aor)
        if record is None:
            record = Record(contact.aor, core_hash(contact.aor), next(self._seq))
            self._records[contact.aor] = record
        self._claim_ruid(contact)
        _insert_sorted(record.contacts, contact)

    def _replace(self, record: Record, old: Contact, new: Contact) -> None:
        if old.ruid != new.ruid:
            self._release_ruid(old)
            self._claim_ruid(new)
        index = _index(record.contacts, old)
        if old.q == new.q:
            record.contacts[index] = new
        else:
            del record.contacts[index]
            _insert_sorted(record.contacts, new)

    def _delete(self, record: Record, contact: Contact) -> None:
        del record.contacts[_index(record.contacts, contact)]
        self._release_ruid(contact)
        if not record.contacts:
            del self._records[record.aor]

    def _claim_ruid(self, contact: Contact) -> None:
        """Index ``contact.ruid``; a ruid is unique, so a contact holding it elsewhere goes."""
        if not contact.ruid:
            return
        holder = self._ruids.get(contact.ruid)
        if holder is not None and holder != contact.aor:
            other = self._records[holder]
            stale = self._find_ruid(other, contact.ruid)
            if stale is not None:
                self._delete(other, stale)
        self._ruids[contact.ruid] = contact.aor

    def _release_ruid(self, contact: Contact) -> None:
        if contact.ruid and self._ruids.get(contact.ruid) == contact.aor:
            del self._ruids[contact.ruid]


def _find_uri(record: Record, uri: str) -> Contact | None:
    """usrloc's ``contact_match`` (matching_mode 0): the Contact URI byte for byte."""
    for c in record.contacts:
        if c.uri == uri:
            return c
    return None


def _index(contacts: list[Contact], contact: Contact) -> int:
    """Position of this very object (two contacts may compare equal)."""
    for i, c in enumerate(contacts):
        if c is contact:
            return i
    raise ValueError("contact not in record")


def _insert_sorted(contacts: list[Contact], contact: Contact) -> None:
    for i, c in enumerate(contacts):
        if c.q < contact.q:
            contacts.insert(i, contact)
            return
    contacts.append(contact)
