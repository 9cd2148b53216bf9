"""CPU that the parse helper's work costs per message, in one process (not a test).

What the helper process does for each message the worker hands it (see
``intake.understand.parse_guard``): parse, score by the low-quality rules, read the text work,
and pickle the result for the pipe; on N 4 KB benchmark reports (as throughput.py builds them,
with intake's trace fields on top). ``process_cost.py`` runs the worker; the helper is a process
of its own, which callgrind follows only with ``--trace-children=yes``, where its start-up under
valgrind can outlast the worker's wait for it. Count instructions per message at two sizes:

    .venv/bin/python benchmarks/parse_cost.py -n 400
    valgrind --tool=callgrind --callgrind-out-file=/tmp/pc.400 .venv/bin/python benchmarks/parse_cost.py -n 400
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import build_message, make_body  # noqa: E402

from intake.config.settings import load_settings  # noqa: E402
from intake.understand import parse_guard  # noqa: E402
from intake.understand.parse import parse  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRACE = (b"Return-Path: <researcher@loadgen.test>\r\n"
         b"Received: from client.test (localhost [127.0.0.1]) by intake.example.com with ESMTP;\r\n"
         b"\tMon, 01 Jun 2026 12:00:00 +0000\r\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=400)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    settings = load_settings(ROOT / "config.toml")
    rules, budget = settings.quality_rules, settings.processing.message_budget
    body = make_body(args.size)
    messages = [TRACE + build_message("cost", index, body).raw for index in range(args.messages)]
    started = time.process_time()
    for raw in messages:
        outcome = parse_guard._prepare_within(raw, parse, rules, budget)
        assert outcome[0] == "done", outcome
        pickle.dumps(outcome)
    spent = time.process_time() - started
    print(f"{args.messages} messages: parse helper's work {spent / args.messages * 1e3:.2f} ms CPU/message")


if __name__ == "__main__":
    main()
