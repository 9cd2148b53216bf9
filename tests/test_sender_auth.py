"""Sender authentication: trusted Authentication-Results, DKIM verified here with a stub resolver
(keys made and messages signed in the test; never the network), bounded DNS."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import datetime, timezone

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from intake.config.sections import SenderAuthSection
from intake.understand import dns_lookups, sender_auth
from intake.understand.dns_lookups import StaticResolver
from intake.understand.sender_auth import FAIL, NONE, PASS, authenticate

TRUSTED = SenderAuthSection(trusted_authserv_ids=["mx.example.com"])
VERIFY = SenderAuthSection()


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    """(private key PEM, the DKIM key record publishing its public half)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def message(sender: str = "Ana <ana@example.org>", body: str = "The fix is ready.\r\n", extra: str = "") -> bytes:
    return (f"{extra}From: {sender}\r\nTo: security+SEC-2026-0001@intake.test\r\nSubject: Re: [SEC-2026-0001]\r\n"
            f"Message-ID: <m1@example.org>\r\n\r\n{body}").encode()


def signed(raw: bytes, pem: bytes, domain: str = "example.org", selector: str = "sel", **options) -> bytes:
    signature = dkim.sign(raw, selector.encode(), domain.encode(), pem,
                          include_headers=[b"from", b"to", b"subject", b"message-id"], **options)
    return signature + raw


def dns(key_record: str, domain: str = "example.org", dmarc: str | None = "v=DMARC1; p=reject") -> StaticResolver:
    records = {f"sel._domainkey.{domain}": [key_record]}
    if dmarc:
        records["_dmarc.example.org"] = [dmarc]
    return StaticResolver(records)


def test_a_valid_signature_aligned_with_the_from_domain_passes(key):
    pem, record = key
    resolver = dns(record)
    verdict = authenticate(signed(message(), pem), "ana@example.org", VERIFY, resolver)
    assert (verdict.result, verdict.method, verdict.from_domain, verdict.dmarc_published) == (
        PASS, "dkim", "example.org", True)
    assert verdict.authenticated and "dkim=pass d=example.org" in verdict.reason
    assert resolver.lookups == ["_dmarc.example.org", "sel._domainkey.example.org"]


def test_a_subdomain_signature_is_aligned_relaxed_but_not_under_adkim_s(key):
    pem, record = key
    raw = signed(message(sender="ana@lists.example.org"), pem)
    relaxed = StaticResolver({"sel._domainkey.example.org": [record], "_dmarc.example.org": ["v=DMARC1; p=none"]})
    assert authenticate(raw, "ana@lists.example.org", VERIFY, relaxed).result == PASS
    strict = StaticResolver({"sel._domainkey.example.org": [record],
                             "_dmarc.example.org": ["v=DMARC1; p=reject; adkim=s"]})
    verdict = authenticate(raw, "ana@lists.example.org", VERIFY, strict)
    assert verdict.result == FAIL and "not aligned" in verdict.reason
    # The organisational domain comes from the public-suffix list: co.uk is a suffix, not an org.
    assert sender_auth.aligned("mail.example.co.uk", "example.co.uk")
    assert not sender_auth.aligned("attacker.co.uk", "example.co.uk")


def test_a_tampered_body_fails(key):
    pem, record = key
    raw = signed(message(), pem).replace(b"The fix is ready.", b"Send your PoC to mallory@evil.test.")
    verdict = authenticate(raw, "ana@example.org", VERIFY, dns(record))
    assert verdict.result == FAIL and "does not verify" in verdict.reason


def test_a_signature_of_another_domain_fails_without_looking_its_key_up(key):
    pem, record = key
    resolver = dns(record, domain="evil.test")
    verdict = authenticate(signed(message(), pem, domain="evil.test"), "ana@example.org", VERIFY, resolver)
    assert verdict.result == FAIL and "d=evil.test not aligned with From: example.org" in verdict.reason
    assert resolver.lookups == ["_dmarc.example.org"]


def test_no_signature_is_none_and_says_whether_the_domain_publishes_dmarc():
    published = authenticate(message(), "ana@example.org", VERIFY, StaticResolver({"_dmarc.example.org": [
        "v=DMARC1; p=reject"]}))
    assert (published.result, published.reason, published.dmarc_published) == (NONE, "no DKIM signature", True)
    # Looked up at the organisational domain too (RFC 7489 6.6.3), then known not to publish.
    resolver = StaticResolver()
    unpublished = authenticate(message(sender="ana@mail.example.org"), "ana@mail.example.org", VERIFY, resolver)
    assert (unpublished.result, unpublished.dmarc_published) == (NONE, False)
    assert resolver.lookups == ["_dmarc.mail.example.org", "_dmarc.example.org"]


def test_a_signature_over_part_of_the_body_does_not_count(key):
    pem, record = key
    raw = signed(message(), pem, length=True) + b"P.S. appended by someone else\r\n"
    verdict = authenticate(raw, "ana@example.org", VERIFY, dns(record))
    assert verdict.result == FAIL and "(l=)" in verdict.reason


@pytest.mark.parametrize(("canonicalize", "flood"), [((b"relaxed", b"relaxed"), " \t\r\n\r\n" * 50_000),
                                                    ((b"simple", b"simple"), "\r\n" * 100_000)])
def test_a_blank_line_flood_after_a_signed_body_still_verifies_and_is_cut_before_dkimpy(key, canonicalize, flood):
    pem, record = key
    raw = message(body="The fix is ready.  \r\n" + flood)
    verdict = authenticate(signed(raw, pem, canonicalize=canonicalize), "ana@example.org", VERIFY, dns(record))
    assert verdict.result == PASS
    # What dkimpy canonicalises: the flood cut to one line ending (count work, not time).
    body = sender_auth._split(raw)[1]
    ready = sender_auth._relaxed_body(body) if canonicalize[1] == b"relaxed" else \
        sender_auth._without_trailing_lines(body, False)
    assert len(ready) < 30


@given(st.binary().map(lambda b: bytes(b" \t\r\nx"[c % 5] for c in b)))
@settings(max_examples=300, deadline=None)
def test_the_body_given_to_dkimpy_canonicalises_as_the_message_does(body):
    from dkim.canonicalization import Relaxed, Simple

    reference = dkim.rfc822_parse(b"From: a@example.org\r\n\r\n" + body)[1]
    ours = sender_auth._dkim_body(body)
    assert ours == reference
    assert Simple.canonicalize_body(sender_auth._without_trailing_lines(ours, False)) == Simple.canonicalize_body(ours)
    assert Relaxed.canonicalize_body(sender_auth._without_trailing_lines(ours, True)) == Relaxed.canonicalize_body(ours)
    # The relaxed form made here is dkimpy's, which dkimpy leaves unchanged: no blank run, no
    # blank before a line end, so its quadratic `[\t ]+\r\n` has nothing to backtrack over.
    relaxed = sender_auth._relaxed_body(ours)
    assert Relaxed.canonicalize_body(relaxed) == Relaxed.canonicalize_body(ours)
    assert b"\t" not in relaxed and b"  " not in relaxed and b" \r\n" not in relaxed


@given(st.lists(st.sampled_from([b"From: ", b"from:", b"FROM :", b"Authentication-Results: ", b"To: ", b"X-A:", b" ",
                                  b"\t", b"\r\n", b"\n", b"\r", b"Ana <ana@example.org>", b"x", b":", b"From ",
                                  b"\xc3\xa9", b"=?utf-8?q?x?=", b";", b"(c)", b"\x0b"]), max_size=30).map(b"".join))
@settings(max_examples=1000, deadline=None)
def test_a_plain_header_section_reads_as_the_stdlib_parser_reads_it(raw):
    # The stdlib's compat32 parser is skipped for plain header sections: the From: and
    # Authentication-Results values judged must be the ones it would give.
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    block = sender_auth._header_section(raw)
    plain = sender_auth._plain_fields(block)
    if plain is None:
        return
    parsed = BytesHeaderParser(policy=compat32).parsebytes(block)
    for name in ("From", "Authentication-Results", "To", "X-A"):
        expected = parsed.get_all(name)
        assert plain.get_all(name) == (None if expected is None else [str(value) for value in expected])


def test_plain_header_sections_are_the_usual_ones_and_odd_ones_go_to_the_stdlib():
    usual = message(extra="Received: from a\r\n\tby b; Mon, 1 Jun 2026\r\n")
    assert sender_auth._plain_fields(sender_auth._header_section(usual)).get_all("From") == ["Ana <ana@example.org>"]
    for odd in (b"From: a@example.org\rX: y\r\n", " From: a@example.org\r\n".encode(),
                "From: \u00e9 <a@example.org>\r\n".encode(), b"From a@example.org Mon Jun 1\r\nFrom: a@example.org\r\n",
                b":x\r\nFrom: a@example.org\r\n"):
        assert sender_auth._plain_fields(odd) is None


def test_overlong_signatures_are_refused_before_dkimpy_reads_them(key):
    pem, record = key
    raw = signed(message(), pem)
    padded = raw.replace(b"; h=", b"; h=" + b" " * 5000, 1)
    many = raw.replace(b"; h=", b"; h=" + b"x:" * 101, 1)
    for hostile in (padded, many):
        resolver = dns(record)
        verdict = authenticate(hostile, "ana@example.org", VERIFY, resolver)
        assert verdict.result == FAIL and "over 4096 bytes or 100 signed fields" in verdict.reason
        assert resolver.lookups == ["_dmarc.example.org"]


def test_a_message_too_large_to_verify_here_costs_no_key_lookup(key):
    pem, record = key
    raw = signed(message(body="x" * 70 + "\r\n"), pem).replace(b"x" * 70, b"x" * (sender_auth.MAX_VERIFIED_BYTES + 1))
    resolver = dns(record)
    verdict = authenticate(raw, "ana@example.org", VERIFY, resolver)
    assert (verdict.result, verdict.dmarc_published) == (NONE, True) and "up to 4 MiB" in verdict.reason
    assert resolver.lookups == ["_dmarc.example.org"]


# -- trusted Authentication-Results ----------------------------------------------------------------


def with_results(*values: str) -> bytes:
    return message(extra="".join(f"Authentication-Results: {v}\r\n" for v in values))


@pytest.mark.parametrize(("value", "result", "published"), [
    ("mx.example.com; dkim=pass header.d=example.org; dmarc=pass header.from=example.org", PASS, True),
    ("mx.example.com; spf=pass smtp.mailfrom=example.org; dmarc=fail header.from=example.org", FAIL, True),
    ("mx.example.com; dkim=pass header.d=example.org; dmarc=none header.from=example.org", PASS, False),
    ("mx.example.com; dkim=pass header.d=mail.example.org", PASS, None),
    ("mx.example.com; dkim=pass header.i=@example.org", PASS, None),
    ("mx.example.com; dkim=pass header.d=evil.test; dmarc=none header.from=example.org", FAIL, False),
    ("mx.example.com; dkim=fail header.d=example.org", FAIL, None),
    ("mx.example.com; dmarc=none header.from=example.org", NONE, False),
    ("mx.example.com; none", NONE, None),
])
def test_a_trusted_header_decides_without_any_lookup(value, result, published):
    resolver = StaticResolver()
    verdict = authenticate(with_results(value), "ana@example.org", TRUSTED, resolver)
    assert (verdict.result, verdict.dmarc_published, verdict.method) == (result, published, "authentication-results")
    assert "(by mx.example.com)" in verdict.reason
    assert resolver.lookups == []


def test_authentication_results_of_an_untrusted_authserv_id_are_ignored():
    forged = with_results("mx.evil.test; dmarc=pass header.from=example.org")
    assert authenticate(forged, "ana@example.org", TRUSTED, StaticResolver()).reason == "no DKIM signature"
    # Nothing is trusted by default: the same header with our id means nothing either.
    ours = with_results("mx.example.com; dmarc=pass header.from=example.org")
    assert authenticate(ours, "ana@example.org", VERIFY, StaticResolver()).result == NONE


def test_a_forged_trusted_header_below_the_topmost_is_ignored():
    """A sender writes 'mx.example.com; dmarc=pass' into their message; our MX adds its own above."""
    raw = with_results("mx.example.com; dmarc=fail header.from=example.org",
                       "mx.example.com; dmarc=pass header.from=example.org")
    verdict = authenticate(raw, "ana@example.org", TRUSTED, StaticResolver())
    assert verdict.result == FAIL and verdict.reason == "dmarc=fail header.from=example.org (by mx.example.com)"


def test_a_trusted_result_about_another_domain_is_not_about_this_from():
    raw = with_results("mx.example.com; dmarc=pass header.from=evil.test")
    assert authenticate(raw, "ana@example.org", TRUSTED, StaticResolver()).result == NONE


# -- limits: DNS, hostile From: ---------------------------------------------------------------------


def test_a_dns_timeout_gives_a_temperror_verdict_not_an_exception(key):
    pem, record = key
    resolver = StaticResolver({"_dmarc.example.org": ["v=DMARC1; p=reject"],
                               "sel._domainkey.example.org": TimeoutError})
    verdict = authenticate(signed(message(), pem), "ana@example.org", VERIFY, resolver)
    assert verdict.result == NONE and "temperror: DNS lookup of sel._domainkey.example.org timed out" in verdict.reason
    # A DMARC record that cannot be had: unknown, and only an exactly matching signature may pass.
    resolver = StaticResolver({"_dmarc.example.org": TimeoutError, "sel._domainkey.example.org": [record]})
    verdict = authenticate(signed(message(), pem), "ana@example.org", VERIFY, resolver)
    assert (verdict.result, verdict.dmarc_published) == (PASS, None) and "temperror" in verdict.reason


def test_lookups_per_message_are_bounded(key):
    pem, record = key
    raw = message(sender="ana@a.b.example.org")
    for selector in ["s1", "s2", "s3", "s4", "s5"]:
        raw = signed(raw, pem, domain="example.org", selector=selector)
    resolver = StaticResolver()  # no keys, no DMARC: every lookup is spent
    verdict = authenticate(raw, "ana@a.b.example.org", SenderAuthSection(max_dns_lookups=3), resolver)
    assert len(resolver.lookups) == 3 and verdict.result == NONE and "budget" in verdict.reason
    # Unbounded by the budget, still at most MAX_SIGNATURES keys plus the two DMARC lookups.
    resolver = StaticResolver()
    authenticate(raw, "ana@a.b.example.org", SenderAuthSection(max_dns_lookups=20), resolver)
    assert len(resolver.lookups) == 2 + sender_auth.MAX_SIGNATURES


def test_verify_false_and_no_resolver_make_no_lookup():
    resolver = StaticResolver()
    verdict = authenticate(message(), "ana@example.org", SenderAuthSection(verify=False), resolver)
    assert (verdict.result, resolver.lookups) == (NONE, []) and verdict.reason.startswith("not verified")
    assert authenticate(message(), "ana@example.org", VERIFY, None).reason.startswith("not verified")


@pytest.mark.parametrize(("raw", "parsed", "result", "reason"), [
    (b"Subject: x\r\n\r\nbody", "", NONE, "no From: header"),
    (b"From: a@example.org\r\nFrom: b@evil.test\r\n\r\nbody", "a@example.org", FAIL, "2 From: headers"),
    (b"From: a@example.org, b@evil.test\r\n\r\nbody", "a@example.org", FAIL, "holds 2 addresses"),
    (b"From: undisclosed:;\r\n\r\nbody", "", FAIL, "holds no addresses"),
    ("From: a@b\u00fccher.example\r\n\r\nbody".encode(), "a@b\u00fccher.example", NONE, "not ASCII"),
    (b"From: a@exa_mple..org\r\n\r\nbody", "a@exa_mple..org", FAIL, "not a valid domain"),
    (b"From: \"b@evil.test\" <a@example.org>\r\n\r\nbody", "b@evil.test", FAIL, "ambiguous"),
    (b"From: a@example.org\r\nDKIM-Signature: v=1; garbage\x00\xff\r\n\r\nbody", "a@example.org", FAIL,
     "malformed DKIM signature"),
    (b"\xff\xfe\x00From:\r\n\r\n", "", NONE, "no From: header"),
])
def test_hostile_from_headers_get_a_verdict_never_an_exception(raw, parsed, result, reason):
    verdict = authenticate(raw, parsed, TRUSTED, StaticResolver())
    assert verdict.result == result and reason in verdict.reason


# -- in the service: computed before any lock, stored, shown -------------------------------------

AR_TRUSTED = {"INTAKE_SENDER_AUTH__TRUSTED_AUTHSERV_IDS": '["mx.example.com"]'}


def as_wire(message) -> bytes:  # type: ignore[no-untyped-def]
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def test_verdicts_are_computed_in_prepare_routed_stored_and_shown(make_settings, start_intake_listener, cli,
                                                                   stub_dns, key):
    from conftest import process, report, smtp_send
    from intake.store import inbound
    from intake.run.processor import _plan
    from intake.run.processor import prepare

    pem, record = key
    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report(message_id="<r1@researcher.test>"))
    reply = report(subject="More detail", message_id="<r2@researcher.test>", In_Reply_To="<r1@researcher.test>")
    raw = as_wire(reply)
    signature = dkim.sign(raw, b"sel", b"researcher.test", pem, include_headers=[b"from", b"subject"])
    smtp_send(running.port, signature + raw)
    stub_dns.records["sel._domainkey.researcher.test"] = [record]

    items = [prepare(settings, stored) for stored in inbound.pending(running.engine, 10)]
    # A stranger's new report cannot gain privilege: no lookup for it. The reply could: looked up.
    assert [item.authentication.result for item in items] == [NONE, PASS]
    assert items[0].authentication.reason.startswith("not verified")
    assert stub_dns.lookups == ["_dmarc.researcher.test", "sel._domainkey.researcher.test"]
    plan = _plan(running.engine, settings, items[:1], datetime.now(timezone.utc))
    assert plan.routed[0].incoming.authentication == items[0].authentication  # what route reads

    assert process(settings, running.engine).decisions == {"new-ticket": 1, "reporter-reply": 1}
    shown = json.loads(cli("show", f"SEC-{datetime.now(timezone.utc).year}-0001", "--json").output)
    assert [(m["authentication"]["result"], m["authentication"]["method"]) for m in shown["messages"]] == [
        (NONE, NONE), (PASS, "dkim")]
    assert shown["messages"][1]["authentication"]["reason"] == "dkim=pass d=researcher.test aligned with From: " \
                                                               "researcher.test"
    assert shown["messages"][1]["authentication"]["from_domain"] == "researcher.test"
    human = cli("show", f"SEC-{datetime.now(timezone.utc).year}-0001").output
    assert "sender pass: dkim=pass d=researcher.test" in human
    assert "sender none: not verified" in human


def test_a_trusted_header_costs_no_lookup_in_the_service(make_settings, start_intake_listener,
                                                         cli, stub_dns):
    from conftest import process, report, smtp_send
    from intake.tickets import reads

    settings = make_settings(**AR_TRUSTED)
    running = start_intake_listener(settings)
    smtp_send(running.port, report(message_id="<r1@researcher.test>"))
    forged = report(subject="Close it", message_id="<r2@researcher.test>", In_Reply_To="<r1@researcher.test>")
    # Our MX's header on top; the sender's own "pass" below it means nothing.
    raw = (b"Authentication-Results: mx.example.com; dkim=none; dmarc=fail header.from=researcher.test\r\n"
           b"Authentication-Results: mx.example.com; dmarc=pass header.from=researcher.test\r\n" + as_wire(forged))
    smtp_send(running.port, raw)
    process(settings, running.engine)
    assert stub_dns.lookups == []
    [_, message] = reads.ticket_detail(running.engine, f"SEC-{datetime.now(timezone.utc).year}-0001").messages
    assert message.authentication["result"] == FAIL
    assert message.authentication["reason"] == "dmarc=fail header.from=researcher.test (by mx.example.com)"


def test_only_mail_that_could_gain_privilege_is_looked_up(make_settings, start_intake_listener, config_file,
                                                          stub_dns):
    """The DNS cost of a stranger's mail is nil: only +tag, threading, a subject reference or a
    maintainer sender make lookups (each such message here: its DMARC record, looked up once)."""
    from conftest import report, smtp_send
    from intake.store import inbound
    from intake.run.processor import prepare

    config_file.write_text(config_file.read_text() + '\n[[maintainers]]\nname = "Ana"\nemail = "ana@maint.test"\n')
    settings = make_settings()
    running = start_intake_listener(settings)
    sent = [
        (report(sender="s1@plain.test"), "s1@plain.test", "security@example.com"),  # a new report: no lookup
        (report(sender="s0@plain.test"), "s0@plain.test", "security+web@example.com"),  # a policy tag: none
        (report(sender="s2@tag.test"), "s2@tag.test", "security+SEC-2026-0001@example.com"),
        (report(sender="s3@thread.test", References="<x@y>"), "s3@thread.test", "security@example.com"),
        (report(sender="s4@subject.test", subject="Re: [sec-2026-0001] more"), "s4@subject.test",
         "security@example.com"),
        (report(sender="ana@maint.test"), "ana@maint.test", "security@example.com"),
        (report(sender="ana@maint.test"), "forged@plain.test", "security@example.com"),  # From: a maintainer
    ]
    for message, mail_from, rcpt in sent:
        smtp_send(running.port, message, mail_from=mail_from, rcpt_tos=[rcpt])
    items = [prepare(settings, stored) for stored in inbound.pending(running.engine, 10)]
    assert [item.authentication.result for item in items] == [NONE] * 7
    assert stub_dns.lookups == ["_dmarc.tag.test", "_dmarc.thread.test", "_dmarc.subject.test", "_dmarc.maint.test",
                                "_dmarc.maint.test"]


# -- the dnspython resolver, against a DNS server on loopback --------------------------------------


class LoopbackDns:
    """A UDP DNS server on 127.0.0.1 answering TXT queries from *zone*: a list of strings per name
    (one record of several strings), None for no answer at all; other names are NXDOMAIN."""

    def __init__(self, zone: dict[str, list[str] | None]) -> None:
        import socket
        import threading

        self.zone, self.queries = zone, []
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.port = self.socket.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rrset

        while self.running:
            try:
                wire, peer = self.socket.recvfrom(4096)
            except OSError:
                continue
            query = dns.message.from_wire(wire)
            name = query.question[0].name.to_text().rstrip(".").lower()
            self.queries.append(name)
            strings = self.zone.get(name, [])
            if strings is None:
                continue  # never answered: the client times out
            response = dns.message.make_response(query)
            if name in self.zone:
                text = " ".join('"' + s.replace('"', '\\"') + '"' for s in strings)
                response.answer.append(dns.rrset.from_text(name + ".", 120, "IN", "TXT", text))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.socket.sendto(response.to_wire(), peer)

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=5)
        self.socket.close()


@pytest.fixture
def loopback_dns():  # type: ignore[no-untyped-def]
    servers = []

    def start(zone):  # type: ignore[no-untyped-def]
        servers.append(LoopbackDns(zone))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_the_dns_resolver_joins_strings_caches_answers_and_times_out(loopback_dns):
    server = loopback_dns({"_dmarc.example.org": ["v=DMARC1; ", "p=reject"], "_dmarc.slow.test": None})
    resolver = dns_lookups.DnsResolver(0.3, nameservers=["127.0.0.1"], port=server.port)
    assert resolver.txt("_dmarc.example.org") == [b"v=DMARC1; p=reject"]
    assert resolver.txt("_DMARC.example.org.") == [b"v=DMARC1; p=reject"]  # from the cache
    assert resolver.txt("_dmarc.nowhere.test") == [] == resolver.txt("_dmarc.nowhere.test")  # NXDOMAIN, cached
    assert server.queries == ["_dmarc.example.org", "_dmarc.nowhere.test"]
    with pytest.raises(TimeoutError):
        resolver.txt("_dmarc.slow.test")
    asked = len(server.queries)
    # Through authenticate: the timeout is a verdict, not an exception; and the name that timed
    # out is not asked again for a while (a slow name server costs one timeout, not one per mail).
    verdict = authenticate(message(sender="a@slow.test"), "a@slow.test", VERIFY, resolver)
    assert verdict.result == NONE and "temperror: DNS lookup of _dmarc.slow.test timed out" in verdict.reason
    assert len(server.queries) == asked


def test_a_batch_stops_asking_dns_once_its_time_is_spent():
    """A slow name server (the sender's own) cannot make every message of a batch wait for
    max_dns_lookups x dns_timeout: past the batch's DNS time, lookups fail at once."""
    clock = [0.0]

    class Slow:
        asked: list[str] = []

        def txt(self, name: str) -> list[bytes]:
            self.asked.append(name)
            clock[0] += 2.0  # each lookup takes its whole timeout
            raise TimeoutError(f"{name}: no answer")

    slow = Slow()
    budget = dns_lookups.TimeBudget(slow, dns_lookups.batch_dns_seconds(VERIFY), clock=lambda: clock[0])
    verdicts = [authenticate(message(sender=f"a@slow{n}.test"), f"a@slow{n}.test", VERIFY, budget)
                for n in range(50)]
    assert all(v.result == NONE and "temperror" in v.reason for v in verdicts)
    # 2 x dns_timeout x max_dns_lookups seconds of lookups, then none: 8 of them, not 50 x 2.
    assert VERIFY.dns_timeout == 2.0 and len(slow.asked) == dns_lookups.batch_dns_seconds(VERIFY) / 2.0 == 8


def test_no_test_can_reach_real_dns():
    """conftest's stub_dns: the service's resolver is the stub, and dnspython refuses real servers."""
    assert isinstance(dns_lookups.system_resolver(VERIFY), StaticResolver)
    with pytest.raises(OSError, match="NoNameservers"):
        dns_lookups.dns_resolver(0.5).txt("_dmarc.example.org")


def test_no_dns_lookup_runs_while_the_write_lock_is_held(make_settings, start_intake_listener, stub_dns, sqlite_url,
                                                         monkeypatch, key):
    """Each lookup probes SQLite's writer lock from another connection: it is always free."""
    import sqlite3

    from conftest import process, report, smtp_send

    pem, record = key
    settings = make_settings(INTAKE_DATABASE__URL=sqlite_url)
    running = start_intake_listener(settings)
    smtp_send(running.port, report(message_id="<r1@researcher.test>"))
    process(settings, running.engine)
    raw = as_wire(report(subject="More", In_Reply_To="<r1@researcher.test>"))
    smtp_send(running.port, dkim.sign(raw, b"sel", b"researcher.test", pem) + raw)
    stub_dns.records["sel._domainkey.researcher.test"] = [record]
    lock_free = []
    lookup = stub_dns.txt

    def probing(name: str) -> list[bytes]:
        probe = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=0)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.rollback()
            lock_free.append(True)
        except sqlite3.OperationalError:
            lock_free.append(False)
        finally:
            probe.close()
        return lookup(name)

    monkeypatch.setattr(stub_dns, "txt", probing)
    assert process(settings, running.engine).decisions == {"reporter-reply": 1}
    assert lock_free == [True, True]  # _dmarc.researcher.test, sel._domainkey.researcher.test


def test_a_verdict_is_stored_as_every_field_it_has_and_its_reason_is_printable():
    """What processing stores of a verdict: each field as dataclasses.asdict gives it (the reason
    one printable line, also when it quotes a sender's control character)."""
    raw = b"From: a@\x01bad\r\nSubject: x\r\n\r\nbody\r\n"
    for verdict in (authenticate(raw, "a@\x01bad", SenderAuthSection(), None),
                    authenticate(b"From: a@example.org\r\n\r\nbody\r\n", "a@example.org", SenderAuthSection(), None)):
        assert verdict.as_dict() == dataclasses.asdict(verdict) and verdict.reason.isprintable()
        assert list(verdict.as_dict()) == [field.name for field in dataclasses.fields(verdict)]
