"""Low-quality scoring: the rules-file contract, the matchers, and the shipped rules file judged on
realistic beg-bounty mail and realistic genuine reports."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from intake.understand.parsed_mail import Attachment, ParsedMail
from intake.understand.quality import RuleSet, RulesError, SpamScore, load_rules, parse_rules

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_RULES = ROOT / "src" / "intake" / "understand" / "rules" / "low-quality.toml"

# ParsedMail is growing cc / recipient_count / undisclosed_recipients. Until it has them, a
# subclass with the same attribute names stands in (score() only reads attributes).
_NEW_FIELDS = {"cc", "recipient_count", "undisclosed_recipients"}
if _NEW_FIELDS <= {f.name for f in dataclasses.fields(ParsedMail)}:
    Mail = ParsedMail
else:
    @dataclass(frozen=True)
    class Mail(ParsedMail):  # type: ignore[no-redef]
        cc: list[str] = field(default_factory=list)
        recipient_count: int = 1
        undisclosed_recipients: bool = False


def mail(subject: str, body: str, *, to: list[str] | None = None, cc: list[str] | None = None,
         undisclosed: bool = False, attachments: list[tuple[str, str]] = ()) -> ParsedMail:
    """A ParsedMail as parse() would build it for a new report."""
    to = ["security@example.com"] if to is None else to
    cc = cc or []
    return Mail(
        message_id="<m1@researcher.test>", subject=subject, from_address="someone@researcher.test",
        from_name="Some One", to=to, in_reply_to=None, references=[], auto_submitted=None,
        precedence=None, content_type="text/plain", body_text=body,
        attachments=[Attachment(index=i, filename=name, original_filename=name, content_type=kind, size=1000,
                                sha256="0" * 64) for i, (name, kind) in enumerate(attachments, start=1)],
        cc=cc, recipient_count=len(to) + len(cc), undisclosed_recipients=undisclosed,
    )


@pytest.fixture(scope="module")
def shipped() -> RuleSet:
    return load_rules(SHIPPED_RULES)


# -- realistic mail ---------------------------------------------------------------------------

# The example from the issue.
BEG_DMARC_SHORT = mail(
    "Security vulnerability",
    "Hi, I found a critical vulnerability in your website, missing DMARC record. Do you offer a bug bounty?\n",
)

BEG_DMARC_TEMPLATE = mail(
    "Vulnerability Report: Email Spoofing",
    """Hello Team,

I am an independent security researcher and I found a vulnerability on your domain vaixus.tech.

Vulnerability: Missing DMARC record and SPF softfail
Severity: High

Description:
Your domain does not have a DMARC record and the SPF record ends in ~all. Because of this an
attacker can send spoofed emails from your domain to your customers and employees.

Proof: https://mxtoolbox.com/SuperTool.aspx?action=dmarc%3avaixus.tech&run=toolpage

Impact:
An attacker can use email spoofing for phishing and scams, damaging your reputation.

Fix: publish a DMARC record with p=reject.

Please let me know whether you have a bug bounty program. I am waiting for your reply.

Regards,
Cyber Hunter
""",
)

BEG_BOUNTY_FIRST = mail(
    "Critical bug in your website",
    """Hello,

I have found a serious security vulnerability in your website which can lead to full account
takeover. Before sharing the details, could you confirm what is the reward for this? I accept
payment via PayPal.

Thanks
""",
)

BEG_SCANNER_PASTE_BCC = mail(
    "Security issues found on your website",
    """Dear Sir/Madam,

During a security review of your website I found the following issues (OWASP ZAP scan results):

Alert: Missing Anti-clickjacking Header
Risk: Medium
Confidence: Medium
URL: https://www.example.com/
Method: GET
Parameter: x-frame-options
Instances: 3
Solution: Modern Web browsers support the Content-Security-Policy and X-Frame-Options HTTP headers.
CWE Id: 1021
WASC Id: 15

Alert: X-Content-Type-Options Header Missing
Risk: Low
Confidence: Medium
Instances: 12
CWE Id: 693

Kindly fix these issues. I hope you will consider a reward for my work.
""",
    to=[], undisclosed=True,
)

BEG_SELF_XSS = mail(
    "XSS vulnerability",
    """Hi security team,

I found a self-XSS on your contact page: if a user pastes <script>alert(1)</script> into the
name field it executes in their own browser.

Is there any bounty for this?
""",
)

BEG_HEADERS_MASS = mail(
    "Website security issue",
    """Hello,

I found that your website is missing security headers: Strict-Transport-Security,
Content-Security-Policy and X-Content-Type-Options are not set. This makes your users
vulnerable to attacks. Please fix it as soon as possible.

Best regards
""",
    to=["security@example.com", "info@example.com", "support@example.com", "admin@example.com"],
    cc=["sales@example.com", "hr@example.com", "ceo@example.com"],
)

BEG_LOGOUT_CSRF = mail(
    "CSRF vulnerability",
    """Hello,

Your website is vulnerable to Cross-Site Request Forgery on the logout function. An attacker can
log out any user by sending them a link. This is a high severity issue.

Waiting for your response.
""",
)

BEG_WEAK_TLS = mail(
    "SSL vulnerability on your server",
    """Hi team,

Your server supports weak SSL ciphers and TLS 1.0 is enabled. Your SSL Labs grade is B, which
means an attacker can decrypt the traffic (SWEET32, BEAST). Please upgrade your configuration.

Regards
""",
)

BEG_BANNER = mail(
    "Information disclosure vulnerability",
    """Hello,

Your web server discloses its version: the Server header reveals nginx/1.18.0 and X-Powered-By
shows PHP/7.4.3. Attackers can use this version information disclosure to find exploits.

Thanks and regards
""",
)

BEG_CLICKJACKING = mail(
    "Clickjacking vulnerability on your home page",
    """Hello,

I found a clickjacking vulnerability on your website. The X-Frame-Options header is missing, so
your home page can be loaded in an iframe by an attacker and users can be tricked into clicking.

Regards
""",
)

BEG_RATE_LIMIT = mail(
    "No rate limit vulnerability",
    """Hi,

There is no rate limiting on your contact form. I sent 500 messages in one minute, which can be
used for email bombing of your support inbox. Do you provide a reward for valid reports?
""",
)

BEG_SCANNER_PDF = mail(
    "VAPT findings for your website",
    """Dear team,

I ran a security assessment of your website. Please find attached the Acunetix scan report with
all findings. Kindly review it and let me know.
""",
    attachments=[("scan_report.pdf", "application/pdf")],
)

BEG_BOUNTY_LONG = mail(  # the same ask as the short ones, in a mail with real substance
    "IDOR in invoice download",
    """Hello EmailConnect security team,

Steps to reproduce:
1. Log in as user A at https://app.emailconnect.eu/login and open Billing.
2. Download an invoice: GET /api/invoices/1042/pdf returns A's invoice.
3. Change the id: curl -H 'Cookie: session=<A>' https://app.emailconnect.eu/api/invoices/1041/pdf
   returns user B's invoice, with B's name, address and VAT number.

Impact: any logged-in user can read every customer's invoices (personal data, GDPR relevant).
The ids are sequential, so enumerating all invoices takes minutes.

Suggested fix: check that the invoice's account is the session's account before serving it.

Do you offer a bug bounty for reports like this one?

Kind regards,
Jane
""",
)

GENUINE_XSS = mail(
    "Stored XSS in the Vectis Admin UI alias page",
    """Hello Vectis security team,

I found a stored cross-site scripting issue in the Admin UI of Vectis Mail (output of
`vectis version`: 0.1.4+build.27).

Description
The display name of a domain alias is rendered without escaping on /admin/domains/<id>/aliases.
Any operator who can create an alias can run script in the session of every other operator who
opens that page.

Steps to reproduce
1. Log in to the Admin UI as an operator.
2. Create an alias whose display name is <img src=x onerror=alert(document.domain)>:

   curl -s -X POST https://vectis.example.test/api/v1/domains/3/aliases \\
     -H 'Authorization: Bearer $TOKEN' \\
     -d '{"name": "a", "display_name": "<img src=x onerror=alert(document.domain)>"}'

3. Open https://vectis.example.test/admin/domains/3/aliases as another operator: the alert fires.

Impact
Session riding as another administrator: create mailboxes, export the DKIM private keys shown in
Settings, change the relay configuration.

Note: the notification mail the alias page sends passes SPF and DKIM, so this is not about email
authentication. I would like to be credited as "Jane Doe (https://jane.example.test)".

Jane
""",
)

GENUINE_DKIM_BYPASS = mail(  # an email-authentication bug in a mail product is a real report
    "DKIM verification skipped for multi-signature messages",
    """Hi,

Vectis Mail 0.1.3 marks a message as DKIM-authenticated when it carries two DKIM-Signature
headers and only the second one verifies, even if the first signs the From domain.

To reproduce:
  $ swaks --to postmaster@vectis.example.test --from ceo@bank.example --data forged.eml
The message lands in the inbox with "dkim=pass header.d=bank.example" in Authentication-Results,
although the only valid signature is for attacker.example. forged.eml is attached.

This lets anyone pass DMARC for any domain towards Vectis users. Could you let me know how you
would like to coordinate disclosure?
""",
    attachments=[("forged.eml", "message/rfc822")],
)

GENUINE_LOGIN_RATE_LIMIT = mail(  # rate limiting on authentication matters
    "No rate limiting on the login API allows password guessing",
    """Hello,

POST /api/v1/session on app.emailconnect.eu has no rate limiting and no lockout. I sent 2,000
login attempts for my own test account in ten minutes without any throttling; the correct
password on attempt 2,000 still logged in.

Steps to reproduce: run the attached script against your own account; it prints the response
codes. Impact: online password guessing against any account.
""",
)

GENUINE_CLICKJACKING = mail(  # clickjacking on a sensitive action, with a PoC
    "Clickjacking on account deletion",
    """Hello,

The account settings page https://app.emailconnect.eu/settings/account can be framed (there is no
X-Frame-Options header and no frame-ancestors directive), and its "Delete account" button needs
one click with no confirmation dialog.

Proof of concept: poc.html (attached) frames the page under a "Claim your prize" button; a victim
who clicks it deletes their account.

Steps to reproduce
1. Log in, then open poc.html from another origin.
2. Click the button: the account is gone.
""",
    attachments=[("poc.html", "text/html")],
)

BEG_BOUNTY = [BEG_DMARC_SHORT, BEG_DMARC_TEMPLATE, BEG_BOUNTY_FIRST, BEG_SCANNER_PASTE_BCC, BEG_SELF_XSS,
              BEG_HEADERS_MASS, BEG_LOGOUT_CSRF, BEG_WEAK_TLS, BEG_BANNER, BEG_CLICKJACKING, BEG_RATE_LIMIT,
              BEG_SCANNER_PDF]
GENUINE = [GENUINE_XSS, GENUINE_DKIM_BYPASS, GENUINE_LOGIN_RATE_LIMIT, GENUINE_CLICKJACKING, BEG_BOUNTY_LONG]

# One realistic mail on which each shipped rule must fire.
FIRES_ON = {
    "missing-email-auth": BEG_DMARC_SHORT,
    "email-auth-spoofing-claim": BEG_DMARC_TEMPLATE,
    "clickjacking": BEG_CLICKJACKING,
    "missing-security-headers": BEG_HEADERS_MASS,
    "banner-disclosure": BEG_BANNER,
    "weak-tls-config": BEG_WEAK_TLS,
    "scanner-report-paste": BEG_SCANNER_PASTE_BCC,
    "scanner-report-attached": BEG_SCANNER_PDF,
    "self-xss": BEG_SELF_XSS,
    "logout-csrf": BEG_LOGOUT_CSRF,
    "rate-limit-non-sensitive": BEG_RATE_LIMIT,
    "no-reproduction-steps": BEG_DMARC_SHORT,
    "bounty-ask": BEG_BOUNTY_FIRST,
    "bounty-ask-short-mail": BEG_DMARC_SHORT,
    "many-recipients": BEG_HEADERS_MASS,
    "undisclosed-recipients": BEG_SCANNER_PASTE_BCC,
}

# A realistic genuine report on which each shipped rule must stay quiet: the one most likely to
# trip it (a real report on the same topic, or the one asking about a bounty).
QUIET_ON = {
    "missing-email-auth": GENUINE_DKIM_BYPASS,
    "email-auth-spoofing-claim": GENUINE_DKIM_BYPASS,
    "clickjacking": GENUINE_XSS,
    "missing-security-headers": GENUINE_CLICKJACKING,
    "banner-disclosure": GENUINE_DKIM_BYPASS,
    "weak-tls-config": GENUINE_XSS,
    "scanner-report-paste": GENUINE_XSS,
    "scanner-report-attached": GENUINE_CLICKJACKING,
    "self-xss": GENUINE_XSS,
    "logout-csrf": GENUINE_XSS,
    "rate-limit-non-sensitive": GENUINE_LOGIN_RATE_LIMIT,
    "no-reproduction-steps": GENUINE_LOGIN_RATE_LIMIT,
    "bounty-ask": GENUINE_XSS,
    "bounty-ask-short-mail": BEG_BOUNTY_LONG,
    "many-recipients": GENUINE_XSS,
    "undisclosed-recipients": GENUINE_XSS,
}


# -- the shipped rules ------------------------------------------------------------------------


def test_every_shipped_rule_has_a_firing_and_a_quiet_example(shipped: RuleSet):
    names = [rule.name for rule in shipped.rules]
    assert sorted(names) == sorted(FIRES_ON) == sorted(QUIET_ON)
    assert all(rule.description for rule in shipped.rules)


@pytest.mark.parametrize("name", sorted(FIRES_ON))
def test_shipped_rule_fires_on_its_example(shipped: RuleSet, name: str):
    assert name in shipped.score(FIRES_ON[name]).matched


@pytest.mark.parametrize("name", sorted(QUIET_ON))
def test_shipped_rule_is_quiet_on_a_genuine_report(shipped: RuleSet, name: str):
    assert name not in shipped.score(QUIET_ON[name]).matched


def test_the_genuine_xss_report_matches_no_rule_at_all(shipped: RuleSet):
    # Mentions SPF and DKIM in passing, asks for credit, has a curl command and URL paths.
    assert shipped.score(GENUINE_XSS) == SpamScore(0.0, [], 5.0, False)


@pytest.mark.parametrize("report", GENUINE, ids=lambda m: m.subject[:40])
def test_genuine_reports_score_below_the_threshold(shipped: RuleSet, report: ParsedMail):
    result = shipped.score(report)
    assert not result.low_quality, result.summary()
    assert result.score < shipped.threshold


@pytest.mark.parametrize("report", BEG_BOUNTY, ids=lambda m: m.subject[:40])
def test_beg_bounty_mail_scores_at_or_above_the_threshold(shipped: RuleSet, report: ParsedMail):
    result = shipped.score(report)
    assert result.low_quality, result.summary()
    assert result.score >= shipped.threshold


def test_the_issue_example_in_detail(shipped: RuleSet):
    result = shipped.score(BEG_DMARC_SHORT)
    assert result.matched == ["missing-email-auth", "no-reproduction-steps", "bounty-ask", "bounty-ask-short-mail"]
    assert result.score == 10.0


def test_a_bounty_ask_weighs_more_in_a_short_mail(shipped: RuleSet):
    short = mail("Question", "Hello, I found a bug in your site. Do you offer a bug bounty?")
    padded = dataclasses.replace(short, body_text=short.body_text + "\n" + "Some more prose here. " * 40)
    assert shipped.score(short).score - shipped.score(padded).score == 2.0
    assert "bounty-ask-short-mail" in shipped.score(short).matched
    assert "bounty-ask-short-mail" not in shipped.score(padded).matched


def test_mentioning_spf_in_passing_or_asking_for_credit_is_not_a_finding(shipped: RuleSet):
    report = dataclasses.replace(
        GENUINE_XSS,
        body_text=GENUINE_XSS.body_text + "\nThe SPF record of the test domain was irrelevant here. "
                                          "Please credit me in the release notes and your hall of fame.\n",
    )
    assert shipped.score(report).matched == []


@pytest.mark.parametrize("text", [
    "There is no issue with SPF: the reset mail passes SPF and DKIM.",
    "Your DMARC policy is p=reject, well done.",
    "The CSP blocked my first payload, so I used a JSONP endpoint to bypass it.",
    "The server reveals nothing useful in its error pages.",
    "Rate limiting is present on the login form.",
    "Please credit me as Jane Doe.",
])
def test_near_miss_sentences_match_no_topic_rule(shipped: RuleSet, text: str):
    matched = shipped.score(mail("Report", text + "\nSteps to reproduce: see above.")).matched
    assert matched == []


@pytest.mark.parametrize(("rule", "text"), [
    ("missing-email-auth", "DMARC Policy Not Enabled"),
    ("missing-email-auth", "SPF Record Not Found"),
    ("missing-email-auth", "No SPF record found for the domain"),
    ("missing-email-auth", "Missing SPF and DMARC records"),
    ("missing-email-auth", "Your domain has a weak DMARC policy (p=none)"),
    ("missing-security-headers", "Content Security Policy (CSP) header not implemented"),
    ("missing-security-headers", "Missing HTTP Strict Transport Security header"),
    ("clickjacking", "Missing X-Frame-Options header"),
    ("weak-tls-config", "TLS 1.0 is enabled on your server"),
    ("rate-limit-non-sensitive", "Rate limiting is not implemented on the forgot password page"),
    ("bounty-ask", "Kindly let me know about the bounty"),
    ("bounty-ask", "Do you pay for vulnerabilities?"),
    ("bounty-ask", "Will I get any reward?"),
    ("bounty-ask", "Is this eligible for a reward?"),
    ("bounty-ask", "What\u2019s the bounty for a critical bug?"),
])
def test_common_beg_bounty_phrasings_are_recognised(shipped: RuleSet, rule: str, text: str):
    assert rule in shipped.score(mail("Report", text + "\nSteps to reproduce: below.")).matched


@pytest.mark.parametrize(("detail", "counts"), [
    ("Steps to reproduce: open the page.", True),
    ("1. Log in\n2. Open the invoice", True),
    ("Step 1: log in", True),
    ("PoC attached.", True),
    ("curl -i https://example.com", True),
    ("GET /api/v1/users/2 HTTP/1.1\nHost: app.example.com", True),
    ("See https://example.com/admin/users", True),
    ("See https://example.com/", False),  # a bare site is not detail
    ("See https://mxtoolbox.com/SuperTool.aspx?action=dmarc", False),  # nor a DNS checker's page
    ("get /foo http/1.1", False),  # request lines are upper case
    ("Host: https://example.com/", False),  # a scanner's "Host:" line is not a request header
])
def test_what_counts_as_reproduction_detail(shipped: RuleSet, detail: str, counts: bool):
    matched = shipped.score(mail("Report", "I found an issue.\n" + detail)).matched
    assert ("no-reproduction-steps" not in matched) is counts


def test_score_exactly_at_the_shipped_threshold_is_low_quality(shipped: RuleSet):
    # missing-security-headers (2.5) + no-reproduction-steps (2.5) = 5.0 = threshold
    report = mail("Security headers", "Your site is missing the HSTS header. Please fix.")
    result = shipped.score(report)
    assert result.matched == ["missing-security-headers", "no-reproduction-steps"]
    assert result.score == shipped.threshold == 5.0
    assert result.low_quality


# -- matcher semantics (small rules written for the test) -------------------------------------


def rules(body: str, threshold: float = 1.0, scan_chars: int | None = None) -> RuleSet:
    head = f"threshold = {threshold}\n" + (f"scan_chars = {scan_chars}\n" if scan_chars else "")
    return parse_rules(head + body, source="test.toml")


def test_threshold_boundary_survives_floating_point_sums():
    ruleset = rules("""
[[rule]]
name = "a"
description = "a"
score = 0.7
subject = ['x']
[[rule]]
name = "b"
description = "b"
score = 0.1
subject = ['x']
""", threshold=0.8)
    result = ruleset.score(mail("x", ""))
    assert 0.7 + 0.1 < 0.8  # what a plain float sum would get wrong
    assert result.score == 0.8
    assert result.low_quality
    just_above = rules("""
[[rule]]
name = "a"
description = "a"
score = 0.7
subject = ['x']
""", threshold=0.700001)
    assert not just_above.score(mail("x", "")).low_quality


def test_all_matchers_must_hold_and_any_pattern_in_a_list_will_do():
    ruleset = rules("""
[[rule]]
name = "both"
description = "subject and body"
score = 1
subject = ['alpha', 'beta']
body = ['gamma']
""")
    assert ruleset.score(mail("beta", "gamma")).matched == ["both"]
    assert ruleset.score(mail("ALPHA", "Gamma")).matched == ["both"]  # case-insensitive by default
    assert ruleset.score(mail("alpha", "delta")).matched == []
    assert ruleset.score(mail("delta", "gamma")).matched == []
    assert ruleset.score(mail("gamma", "alpha")).matched == []  # subject patterns do not look at the body


def test_subject_or_body_and_body_absent():
    ruleset = rules("""
[[rule]]
name = "either"
description = "in subject or body"
score = 1
subject_or_body = ['needle']
[[rule]]
name = "absent"
description = "no steps"
score = 1
body_absent = ['steps', 'poc']
""")
    assert ruleset.score(mail("a needle", "steps")).matched == ["either"]
    assert ruleset.score(mail("x", "the needle")).matched == ["either", "absent"]
    assert ruleset.score(mail("x", "")).matched == ["absent"]
    assert ruleset.score(mail("x", "see the PoC")).matched == []


def test_body_min_matches_counts_different_patterns():
    ruleset = rules("""
[[rule]]
name = "three"
description = "three markers"
score = 1
body = ['^risk:', '^confidence:', '^cwe id:', '^solution:']
body_min_matches = 3
""")
    assert ruleset.score(mail("x", "Risk: low\nConfidence: high\nSolution: fix")).matched == ["three"]
    assert ruleset.score(mail("x", "Risk: low\nRisk: low\nRisk: high\nConfidence: high")).matched == []


def test_numeric_recipient_and_attachment_matchers():
    ruleset = rules("""
[[rule]]
name = "short"
description = "short"
score = 1
max_body_chars = 10
[[rule]]
name = "crowd"
description = "crowd"
score = 1
min_recipients = 3
[[rule]]
name = "bcc"
description = "bcc"
score = 1
undisclosed_recipients = true
[[rule]]
name = "pdf"
description = "pdf or any image"
score = 1
attachment_types = ["application/pdf", "IMAGE/*"]
""")
    assert ruleset.score(mail("x", "  0123456789  \n")).matched == ["short"]
    assert ruleset.score(mail("x", "0123456789a")).matched == []
    assert ruleset.score(mail("x", "long enough body", to=["a@x", "b@x"], cc=["c@x"])).matched == ["crowd"]
    assert ruleset.score(mail("x", "long enough body", to=["a@x"], cc=["c@x"])).matched == []
    assert ruleset.score(mail("x", "long enough body", to=[], undisclosed=True)).matched == ["bcc"]
    assert ruleset.score(mail("x", "long enough body", attachments=[("a.png", "image/png")])).matched == ["pdf"]
    assert ruleset.score(mail("x", "long enough body", attachments=[("r.pdf", "application/PDF; name=r.pdf")])
                         ).matched == ["pdf"]
    assert ruleset.score(mail("x", "long enough body", attachments=[("a.zip", "application/zip")])).matched == []


def test_requires_builds_on_an_earlier_rule():
    ruleset = rules("""
[[rule]]
name = "base"
description = "base"
score = 1
subject = ['bounty']
[[rule]]
name = "bonus"
description = "base and short"
score = 2
requires = ["base"]
max_body_chars = 5
""")
    assert ruleset.score(mail("bounty?", "hi")).matched == ["base", "bonus"]
    assert ruleset.score(mail("bounty?", "hi")).score == 3.0
    assert ruleset.score(mail("hello", "hi")).matched == []


def test_matched_rules_are_listed_in_file_order():
    ruleset = rules("\n".join(f"""
[[rule]]
name = "r{i}"
description = "r"
score = 1
subject = ['x']""" for i in (3, 1, 2)))
    assert ruleset.score(mail("x", "")).matched == ["r3", "r1", "r2"]


def test_as_dict_is_json_and_round_trips(shipped: RuleSet):
    result = shipped.score(BEG_DMARC_SHORT)
    stored = json.loads(json.dumps(result.as_dict()))
    assert stored == {"score": 10.0, "matched": result.matched, "threshold": 5.0, "low_quality": True}
    assert SpamScore.from_dict(stored) == result
    assert result.summary().startswith("low-quality: score 10 >= 5 (missing-email-auth")
    assert shipped.rule("bounty-ask").description == "Asks about a bounty, reward or payment"


# -- bounded work on huge bodies --------------------------------------------------------------

NEEDLE_RULE = """
[[rule]]
name = "needle"
description = "needle"
score = 1
body = ['needle']
[[rule]]
name = "no-steps"
description = "no steps"
score = 1
body_absent = ['steps to reproduce']
"""


@pytest.mark.timeout(60)
def test_only_the_first_scan_chars_of_a_10_mb_body_are_considered():
    ruleset = rules(NEEDLE_RULE, scan_chars=100_000)
    filler = "lorem ipsum dolor sit amet " * (10_000_000 // 27)
    assert ruleset.score(mail("x", "needle " + filler)).matched == ["needle", "no-steps"]
    beyond = ruleset.score(mail("x", filler + " needle steps to reproduce"))
    assert beyond.matched == ["no-steps"]  # neither the needle nor the steps past the cap are seen
    at_edge = "a" * 99_994
    assert ruleset.score(mail("x", at_edge + "needle" + filler)).matched == ["needle", "no-steps"]
    assert ruleset.score(mail("x", at_edge + "a" + "needle" + filler)).matched == ["no-steps"]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("unit", [
    "\n", " ", "\t \n", "1.\n", "step 1\n", "missing ", "no spf ", "spf ~", "http://a", "https://x/", "$ ",
    "do you ", "what is ", "reward ", "risk: ", "a" * 50 + " ", "-" * 80 + "\n", "<" * 10,
])
def test_shipped_rules_stay_fast_on_pathological_10_mb_bodies(shipped: RuleSet, unit: str):
    # Not a timing assertion: a quadratic pattern would blow through the timeout instead of
    # finishing. Every shipped pattern runs over the scanned prefix of each body.
    body = unit * (10_000_000 // len(unit))
    result = shipped.score(mail(unit.strip() * 100, body))
    assert result.threshold == 5.0


# -- invalid rules files ----------------------------------------------------------------------

VALID_RULE = """
[[rule]]
name = "ok"
description = "fine"
score = 1
subject = ['x']
"""


@pytest.mark.parametrize(("text", "expected"), [
    ("threshold = 5\n" + VALID_RULE.replace("subject =", "subjct ="),
     "rule 'ok' (#1): subjct: unknown key"),
    ("threshold = 5\nthreshhold = 4\n" + VALID_RULE, "threshhold: unknown key"),
    ("threshold = 5\n" + VALID_RULE.replace("['x']", "['x', '(unclosed']"),
     "rule 'ok' (#1): subject: Value error, pattern 2 '(unclosed' is not a valid regular expression"),
    ("threshold = 5\n" + VALID_RULE + VALID_RULE, "rule 'ok' is defined twice (rules #1 and #2)"),
    ("threshold = -1\n" + VALID_RULE, "threshold: Input should be greater than 0"),
    ("threshold = 0\n" + VALID_RULE, "threshold: Input should be greater than 0"),
    (VALID_RULE, "threshold: required key is missing"),
    ("threshold = 5\n", "rule: required key is missing"),
    ("threshold = 5\n" + VALID_RULE.replace('name = "ok"', 'name = "Not Kebab"'),
     "rule 'Not Kebab' (#1): name: String should match pattern"),
    ("threshold = 5\n" + VALID_RULE.replace("subject = ['x']", ""), "rule 'ok' (#1): has no matcher"),
    ("threshold = 5\n" + VALID_RULE.replace("score = 1", 'score = "1"'), "rule 'ok' (#1): score: Input should be"),
    ("threshold = 5\n" + VALID_RULE.replace("subject = ['x']", "subject = []"),
     "rule 'ok' (#1): subject: List should have at least 1 item"),
    ("threshold = 5\n" + VALID_RULE.replace("subject = ['x']", "body_min_matches = 2\nbody = ['x']"),
     "body_min_matches = 2 but body has only 1 pattern"),
    ("threshold = 5\n" + VALID_RULE.replace("subject = ['x']", 'requires = ["later"]')
     + VALID_RULE.replace('"ok"', '"later"'), "requires 'later', which is defined later"),
    ("threshold = 5\n" + VALID_RULE.replace("subject = ['x']", 'requires = ["ghost"]'),
     "requires 'ghost', which does not exist"),
    ("threshold = 5\nscan_chars = 10\n" + VALID_RULE, "scan_chars: Input should be greater than or equal to 1000"),
    ("threshold = 5\n[[rule]\n", "not valid TOML"),
])
def test_invalid_rules_files_are_refused_with_the_problem_named(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected.replace("Value error, ", "") in message


def test_a_missing_rules_file_is_named(tmp_path: Path):
    with pytest.raises(RulesError, match="no-such.toml: no such rules file"):
        load_rules(tmp_path / "no-such.toml")


def test_every_problem_in_a_file_is_reported_at_once():
    text = "threshold = -2\n" + VALID_RULE.replace("subject =", "subjct =") + VALID_RULE.replace('"ok"', '"two"') \
        .replace("['x']", "['[']")
    with pytest.raises(RulesError) as caught:
        parse_rules(text, source="many.toml")
    lines = str(caught.value).splitlines()
    assert any(line.startswith("many.toml: threshold:") for line in lines)
    assert any(line.startswith("many.toml: rule 'ok' (#1): subjct: unknown key") for line in lines)
    assert any(line.startswith("many.toml: rule 'two' (#2): subject:") for line in lines)


# -- the out-of-scope reply -------------------------------------------------------------------


def test_out_of_scope_template_renders_with_the_reply_variables_only():
    from intake.send.composer import render

    text = render("out-of-scope.txt.j2", None, reference="SEC-2026-0007", subject="Missing DMARC record",
                  policy="Vaixus Security Policy", policy_url="https://vaixus.example/policy",
                  from_name="Example Security Team", intake_address="security@example.com", reporter_name="Raj")
    assert text.startswith("Hello Raj,\n")
    assert '"Missing DMARC record"' in text and "[SEC-2026-0007]" in text
    assert 'our security policy, "Vaixus Security Policy"\n(https://vaixus.example/policy), or' in text
    assert "has not been discarded" in text and "steps to reproduce" in text
    assert text.rstrip().endswith("Example Security Team\nsecurity@example.com")
    anonymous = render("out-of-scope.txt.j2", None, reference="SEC-2026-0007", subject="x", policy="",
                       policy_url=None, from_name="T", intake_address="s@example.com", reporter_name="")
    assert anonymous.startswith("Hello,\n")
    assert "our security policy, or that we cannot" in " ".join(anonymous.split())
