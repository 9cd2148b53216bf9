"""What each process of ``intake serve`` imports. A module, once imported, is memory the process
holds for good, in each process that imports it: the listener holds none of the worker's
processing stack (parsing, routing, composing, sending, scheduling), and the parse helper none of
the database's nor the settings' models (SQLAlchemy, SQLModel, pydantic). Each check runs the
process's own start in a fresh interpreter and reads its ``sys.modules``."""

from __future__ import annotations

import pickle
import subprocess
import sys

from conftest import report
from intake.understand import parse_guard
from intake.understand.parse import parse
from intake.understand.quality import SHIPPED_RULES, load_rules

# Neither the parse helper nor any module it uses needs these; each weighs megabytes.
NOT_IN_THE_PARSE_HELPER = ("sqlalchemy", "sqlmodel", "pydantic", "pydantic_settings", "alembic", "babel", "holidays",
                           "apscheduler", "jinja2", "prometheus_client", "intake.config.settings", "intake.store")
# The worker's: the listener stores mail and never parses, routes, composes, sends or schedules.
NOT_IN_THE_LISTENER = ("intake.run.worker", "intake.run.processor", "intake.run.scheduler", "intake.understand.parse",
                       "intake.understand.parse_guard", "intake.understand.route", "intake.send.composer",
                       "intake.send.outbox", "intake.tickets.opening", "mailparser", "html2text", "jinja2", "dkim")


def _modules_after(script: str, stdin: bytes = b"") -> set[str]:
    """The modules a fresh interpreter holds after *script* (which prints nothing itself)."""
    done = subprocess.run([sys.executable, "-c", script + "\nprint('\\n'.join(sys.modules))"], input=stdin,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return set(done.stdout.decode().split())


def _found(modules: set[str], unwanted: tuple[str, ...]) -> list[str]:
    return sorted(name for name in modules if any(name == u or name.startswith(u + ".") for u in unwanted))


def test_the_parse_helper_parses_scores_and_reads_a_report_without_the_database_or_settings_stack():
    # What spawn hands the helper process (its target, the parse function and the rules, pickled),
    # then one message through all the helper does with it: parse, score, text work.
    handed = pickle.dumps((parse_guard._serve, parse, load_rules(SHIPPED_RULES)))
    message = report(body="Steps to reproduce:\n1. ...\nPlease credit me as Jane Doe (@janed).\n#disclose 2026-09-01\n")
    script = f"""
import pickle, sys
_, parse_function, rules = pickle.loads(sys.stdin.buffer.read())
from intake.understand import parse_guard  # imported already, by the target's unpickling
outcome, (mail, quality, work, _) = parse_guard._prepare_within({message.as_bytes()!r}, parse_function, rules, 30.0)
assert outcome == "done" and quality is not None and work.report_credit.name == "Jane Doe", (outcome, quality, work)
"""
    modules = _modules_after(script, handed)
    assert "intake.understand.parse" in modules and "intake.understand.quality_score" in modules  # it did run
    assert _found(modules, NOT_IN_THE_PARSE_HELPER) == []


def test_the_listener_imports_none_of_the_workers_modules(sqlite_url):
    # The console script's `serve` command as `intake serve` finds it, and the schema check at its
    # start on a database at head (which reads the revision without Alembic).
    script = f"""
import importlib, sys
from intake.cli.app import COMMANDS
module, _ = COMMANDS["serve"].target.split(":")
importlib.import_module(module)
from intake.store import schema
from intake.store.db import make_engine
upgraded = schema.upgrade(make_engine({sqlite_url!r}))
assert upgraded.before == upgraded.after == schema.head(), upgraded
"""
    modules = _modules_after(script)
    assert "intake.run.service" in modules and "intake.receive.listener" in modules  # it did run
    assert _found(modules, NOT_IN_THE_LISTENER + ("alembic",)) == []

