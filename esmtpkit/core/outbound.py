"""The outbound side's shared vocabulary: a message to pass on, its recipients, and what became of each.

The queue stores these, the client sends them and the bounce writer reports on them, so they are plain data with
a JSON form (`Message.to_json` / `Message.from_json`) and no Twisted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from esmtpkit.core.commands import CommandError
from esmtpkit.core.deliverby import By, parse_by
from esmtpkit.core.reply import Reply
from esmtpkit.core.rrvs import ValidSince, parse_rrvs

__all__ = ["Status", "Outcome", "Recipient", "Message", "domain_of", "MAX_OUTCOME_TEXT"]

#: Longest reply text an outcome keeps (as Postfix keeps about 512 octets of a remote reply): a hostile server's
#: 100-line reply, copied into every recipient's state, would otherwise swell the queue file or broker message.
MAX_OUTCOME_TEXT = 512


class Status(enum.StrEnum):
    """Where one recipient stands: still to deliver, delivered (a 2xx after the data), or failed for good."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt said about one recipient: the reply (ours or the remote's) and who gave it.

    ``remote`` names the host that answered (``mx.example.net[192.0.2.1]``), or is "" when the answer is ours
    (no route, connection refused, timeout): RFC 3464's Remote-MTA and Diagnostic-Code come from it. ``dsn`` is
    True when that host offered DSN and was given the recipient's NOTIFY and ORCPT, so notices are its to send
    from then on (RFC 3461 §5.2.1); a delivery without it is "relayed" (§5.2.2). ``text`` is cut to
    `MAX_OUTCOME_TEXT` characters.
    """

    code: int
    enhanced: str
    text: str
    remote: str = ""
    dsn: bool = False

    def __post_init__(self) -> None:
        if len(self.text) > MAX_OUTCOME_TEXT:
            object.__setattr__(self, "text", self.text[:MAX_OUTCOME_TEXT - 3] + "...")

    @classmethod
    def of(cls, reply: Reply, remote: str = "", dsn: bool = False) -> "Outcome":
        """The outcome a reply gives; its enhanced code, or the usual one for its basic code."""
        enhanced = reply.enhanced or f"{reply.code // 100}.0.0"
        return cls(reply.code, enhanced, " ".join(line for line in reply.lines if line), remote, dsn)

    @classmethod
    def local(cls, code: int, enhanced: str, text: str) -> "Outcome":
        """An outcome decided here, with no remote reply (``4.4.1`` no answer, ``5.1.10`` null MX, ...)."""
        return cls(code, enhanced, text, "")

    @property
    def delivered(self) -> bool:
        return self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def to_json(self) -> list[Any]:
        data: list[Any] = [self.code, self.enhanced, self.text, self.remote]
        return data + [True] if self.dsn else data

    @classmethod
    def from_json(cls, data: list[Any]) -> "Outcome":
        code, enhanced, text, remote = data[:4]
        return cls(int(code), str(enhanced), str(text), str(remote), bool(data[4]) if len(data) > 4 else False)

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".rstrip()


def _stored_param(parse: Any, value: Any) -> Any:
    """A parameter kept in JSON in its SMTP form, parsed again; ValueError (as for any bad JSON) if it is bad."""
    try:
        return parse(str(value))
    except CommandError as e:
        raise ValueError(f"bad stored parameter {value!r}: {e.reply}") from None


def domain_of(address: str) -> str:
    """The domain part of a mailbox as the envelope holds it, lower-cased; "" for a bare local part."""
    local, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


@dataclass
class Recipient:
    """One envelope recipient on its way out, with its DSN parameters (RFC 3461) and where it stands.

    ``notify`` is None when the client gave no NOTIFY (then failures and delays are reported), else a tuple of
    ``"SUCCESS"``, ``"FAILURE"``, ``"DELAY"`` or just ``("NEVER",)``. ``orcpt`` is ORCPT as received
    (``"rfc822;user@example.org"``, xtext-encoded). ``outcome`` is the latest attempt's; ``reported`` is True once
    a DSN covering its final status (or a delay notice, for ``delay_reported``) has been queued. ``rrvs`` is the
    RRVS request received with it (RFC 7293), passed on to a next hop that offers RRVS.
    """

    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    status: Status = Status.PENDING
    outcome: Outcome | None = None
    reported: bool = False
    delay_reported: bool = False
    rrvs: ValidSince | None = None

    @property
    def domain(self) -> str:
        return domain_of(self.address)

    def wants(self, event: str) -> bool:
        """Whether a DSN for ``event`` ("SUCCESS", "FAILURE" or "DELAY") is wanted (RFC 3461 §4.1 defaults)."""
        if self.notify is None:
            return event in ("FAILURE", "DELAY")
        return event in self.notify

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"address": self.address, "status": self.status.value}
        if self.notify is not None:
            data["notify"] = list(self.notify)
        if self.orcpt is not None:
            data["orcpt"] = self.orcpt
        if self.outcome is not None:
            data["outcome"] = self.outcome.to_json()
        if self.reported:
            data["reported"] = True
        if self.delay_reported:
            data["delay_reported"] = True
        if self.rrvs is not None:
            data["rrvs"] = self.rrvs.param()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Recipient":
        notify = data.get("notify")
        outcome = data.get("outcome")
        rrvs = data.get("rrvs")
        return cls(str(data["address"]), tuple(notify) if notify is not None else None, data.get("orcpt"),
                   Status(data.get("status", "pending")), Outcome.from_json(outcome) if outcome else None,
                   bool(data.get("reported")), bool(data.get("delay_reported")),
                   _stored_param(parse_rrvs, rrvs) if rrvs else None)


@dataclass
class Message:
    """A message on its way out: the envelope as the client gave it, and the state of its delivery.

    ``sender`` is "" for the null reverse-path (a bounce: never bounced itself). ``body`` is None (7BIT),
    ``"8BITMIME"`` or ``"BINARYMIME"``; ``ret`` is None, ``"FULL"`` or ``"HDRS"``; ``envid`` is ENVID decoded.
    ``size`` is the content's length in octets. Times are seconds since the epoch: ``arrived`` when it was
    accepted, ``next_attempt`` when the runner should try again. ``received_from`` describes the client for the
    DSN's Received-From-MTA (``"dns; client.example (192.0.2.7)"``), ``""`` for mail made here.

    What the client asked of the next hops: ``requiretls`` (RFC 8689: only over verified TLS, only to hops that
    offer REQUIRETLS), ``priority`` (RFC 6710 MT-PRIORITY, -9 to 9; None when not given, which counts as 0) and
    ``deliver_by`` (RFC 2852 BY, counted from ``arrived``).

    ``sign`` is True when the message is this server's users' own (an authenticated client, or one inside the
    handler's ``dkim_sign_from``; a notice made here): only such a message is DKIM-signed on its way out, so an
    outsider cannot get a signature for a ``From:`` in our domains. Decided when it is accepted.
    """

    id: str
    sender: str
    recipients: list[Recipient]
    size: int = 0
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    arrived: float = 0.0
    next_attempt: float = 0.0
    attempts: int = 0
    held: bool = False
    received_from: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    requiretls: bool = False
    priority: int | None = None
    deliver_by: By | None = None
    sign: bool = False

    @property
    def rank(self) -> int:
        """The MT-PRIORITY that orders the queue's work: higher goes first among messages due (0 if none given)."""
        return self.priority or 0

    def by_remaining(self, now: float) -> int | None:
        """The by-time left at ``now`` to pass on (RFC 2852 §4), or None without a BY request."""
        return None if self.deliver_by is None else self.deliver_by.remaining(self.arrived, now)

    def by_expired(self, now: float) -> bool:
        """Whether a BY deadline has passed at ``now`` (either mode; mode R then returns the message)."""
        return self.deliver_by is not None and self.deliver_by.expired(self.arrived, now)

    @property
    def pending(self) -> list[int]:
        """Indexes of the recipients still to deliver."""
        return [i for i, r in enumerate(self.recipients) if r.status is Status.PENDING]

    @property
    def done(self) -> bool:
        """True when no recipient is pending (every one delivered or failed)."""
        return all(r.status is not Status.PENDING for r in self.recipients)

    def by_domain(self, indexes: Iterable[int] | None = None) -> dict[str, list[int]]:
        """Pending recipient indexes grouped by domain, in first-seen order (one delivery per domain)."""
        groups: dict[str, list[int]] = {}
        for i in (self.pending if indexes is None else indexes):
            groups.setdefault(self.recipients[i].domain, []).append(i)
        return groups

    def copy(self) -> "Message":
        return replace(self, recipients=[replace(r) for r in self.recipients], extra=dict(self.extra))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id, "sender": self.sender, "recipients": [r.to_json() for r in self.recipients],
            "size": self.size, "body": self.body, "smtputf8": self.smtputf8, "ret": self.ret, "envid": self.envid,
            "arrived": self.arrived, "next_attempt": self.next_attempt, "attempts": self.attempts,
            "held": self.held, "received_from": self.received_from, "extra": self.extra,
        }
        if self.requiretls:
            data["requiretls"] = True
        if self.priority is not None:
            data["priority"] = self.priority
        if self.deliver_by is not None:
            data["by"] = self.deliver_by.param()
        if self.sign:
            data["sign"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Message":
        return cls(
            id=str(data["id"]), sender=str(data["sender"]),
            recipients=[Recipient.from_json(r) for r in data["recipients"]], size=int(data.get("size", 0)),
            body=data.get("body"), smtputf8=bool(data.get("smtputf8")), ret=data.get("ret"),
            envid=data.get("envid"), arrived=float(data.get("arrived", 0.0)),
            next_attempt=float(data.get("next_attempt", 0.0)), attempts=int(data.get("attempts", 0)),
            held=bool(data.get("held")), received_from=str(data.get("received_from", "")),
            extra=dict(data.get("extra") or {}), requiretls=bool(data.get("requiretls")),
            priority=int(data["priority"]) if data.get("priority") is not None else None,
            deliver_by=_stored_param(parse_by, data["by"]) if data.get("by") else None,
            sign=data.get("sign") is True,
        )
