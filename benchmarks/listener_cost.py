"""What the SMTP listener costs in CPU per accepted message, beside a bare aiosmtpd server.

Accepting is CPU-bound on a small machine, so the figure that matters is CPU seconds per
message, not messages per second (which the other sessions on a shared machine distort). For
each of ``--repeats`` rounds this starts, fresh and one after the other, ``discard_server.py``
(bare) and ``intake serve`` (shipped config, a fresh SQLite database; see ``throughput.py``),
sends one warm-up message, then N messages over C concurrent client slots, a new connection for
each (connect, EHLO, MAIL, RCPT, DATA, QUIT), and reads the server's main process's CPU time
(utime + stime from /proc, the commit thread included; intake's worker is a child and not
counted) before and after. It reports each round and the median, in ms per message.

    .venv/bin/python benchmarks/listener_cost.py                 # N=1000, C=20, 4 KB, 3 rounds
    .venv/bin/python benchmarks/listener_cost.py -n 300 --repeats 1 --intake-only
    .venv/bin/python benchmarks/listener_cost.py --json
    .venv/bin/python benchmarks/listener_cost.py --callgrind -n 300 --repeats 1   # instructions instead

CPU time on a machine shared with other work varies by a fifth from round to round. With
``--callgrind`` intake runs under valgrind's callgrind instead (bare is not measured), its
counters zeroed after the warm-up and dumped after the messages: instructions per message in
user space (the kernel's work, system time, is not counted), which other work on the machine
does not change. Start-up under valgrind takes minutes.

Only 127.0.0.1 is contacted; each server run is bounded by ``--timeout`` seconds. Exit status:
0 every message accepted, 1 a run incomplete, 2 a server failed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import (
    GOAL_CONCURRENCY, GOAL_SIZE, Scenario, ServerFailed, bare_server, free_port, intake_server, parse_size,
    progress, send_measured, warm_up,
)


def cost_ms(server_kind: str, scenario: Scenario, timeout: float) -> tuple[float, int]:
    """One fresh *server_kind* ("bare" or "intake"): its main process's CPU ms per accepted message,
    and how many of the scenario's messages it accepted."""
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix=f"intake-listener-cost-{server_kind}-") as tmp:
        workdir, port = Path(tmp), free_port()
        if server_kind == "bare":
            server = bare_server(workdir, port)
        else:
            server = intake_server(workdir / "node", port, f"sqlite:///{workdir / 'intake.db'}", {})
        with server:
            messages = warm_up(server, scenario, deadline)
            load, cpu = send_measured(server, messages, scenario, deadline)
    return (1000 * cpu.server_main / load.accepted if load.accepted else float("nan")), load.accepted


def instructions(scenario: Scenario, timeout: float) -> tuple[float, int]:
    """intake under callgrind: millions of instructions per accepted message (all its threads),
    and how many of the scenario's messages it accepted."""
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="intake-listener-cost-callgrind-") as tmp:
        workdir, port = Path(tmp), free_port()
        out = workdir / "callgrind.out"
        prefix = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable)
        with intake_server(workdir / "node", port, f"sqlite:///{workdir / 'intake.db'}", {}, prefix=prefix) as server:
            messages = warm_up(server, scenario, deadline)
            subprocess.run(["callgrind_control", "--zero", str(server.group)], check=True, capture_output=True)
            load, _ = send_measured(server, messages, scenario, deadline)
            subprocess.run(["callgrind_control", "--dump", str(server.group)], check=True, capture_output=True)
            dump = Path(f"{out}.1")
            while not dump.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            totals = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
    if totals is None or not load.accepted:
        return float("nan"), load.accepted
    return int(totals.group(1)) / load.accepted / 1e6, load.accepted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", "-n", type=int, default=1000)
    parser.add_argument("--concurrency", "-c", type=int, default=GOAL_CONCURRENCY)
    parser.add_argument("--size", "-s", type=parse_size, default=GOAL_SIZE, help="body size, e.g. 4k")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported (default 3)")
    parser.add_argument("--intake-only", action="store_true", help="do not measure the bare server")
    parser.add_argument("--callgrind", action="store_true",
                        help="intake only, under callgrind: instructions per message instead of CPU time")
    parser.add_argument("--timeout", type=float,
                        help="seconds each server run may take (default 300; 1800 with --callgrind)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.timeout is None:
        args.timeout = 1800.0 if args.callgrind else 300.0
    if args.messages < 1 or args.concurrency < 1 or args.repeats < 1:
        parser.error("--messages, --concurrency and --repeats must be at least 1")
    scenario = Scenario(args.size, args.concurrency, args.messages)
    kinds = ["intake"] if args.intake_only or args.callgrind else ["bare", "intake"]
    unit = "M instructions" if args.callgrind else "ms CPU"
    rounds: dict[str, list[float]] = {kind: [] for kind in kinds}
    complete = True
    try:
        for round_ in range(1, args.repeats + 1):
            for kind in kinds:
                figure, accepted = (instructions(scenario, args.timeout) if args.callgrind else
                                    cost_ms(kind, scenario, args.timeout))
                complete = complete and accepted == args.messages
                rounds[kind].append(figure)
                progress(f"round {round_} {kind}: {figure:.3f} {unit} per message ({accepted} accepted)")
    except ServerFailed as exc:
        progress(f"server failed: {exc}")
        return 2
    medians = {kind: statistics.median(values) for kind, values in rounds.items()}
    if args.json:
        print(json.dumps({"scenario": scenario.label, "messages": args.messages, "unit": f"{unit} per message",
                          "rounds": rounds, "median_per_message": medians, "complete": complete}, indent=2))
    else:
        print(f"main-process {unit} per accepted message, {scenario.label}, {args.messages} messages, "
              f"a connection each, median of {args.repeats}:")
        for kind, values in rounds.items():
            print(f"  {kind:7s} {medians[kind]:7.3f}   (rounds: {', '.join(f'{v:.3f}' for v in values)})")
        if "bare" in medians and medians["bare"]:
            print(f"  intake / bare: {medians['intake'] / medians['bare']:.2f}x")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
