"""walstore: inspect, verify, recover, checkpoint and back up a walstore store.

Human output by default; --json on every command but demo prints one JSON document instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import anyio

from . import _backup, _demo, _info, _inspect, _open, _verify
from . import _cli_text as text
from ._errors import CorruptionError, StoreError, StoreFailedError, StoreLockedError

# -- exit codes and output --------------------------------------------------------------------

EXIT_OK = 0
EXIT_PROBLEMS = 1  # problems found, or the path is not a usable store (missing, corrupt journal)
EXIT_USAGE = 2  # the command line is wrong (argparse's own code for that)
EXIT_LOCKED = 3  # another process holds the store and the command needs it
EXIT_FAILED = 4  # the work failed: an I/O error, or no consistent snapshot of a busy store

EPILOG = """\
exit codes:
  0  ok
  1  problems found (verify), or ROOT is not a usable store: missing, not a store, or its
     journal is damaged beyond a torn tail
  2  bad usage: unknown command or option, bad value, DEST inside ROOT
  3  the store is locked: another process has it open and the command needs it
     (recover without --dry-run, checkpoint)
  4  the work failed: an I/O error, or the store failed mid-way
130  interrupted

info, log, verify, recover --dry-run and backup only read the store: they take no lock and
work while another process has it open. Errors are one line on stderr (and, with --json, an
{"error": ..., "exit_code": ...} document on stdout). Set WALSTORE_DEBUG=1 for tracebacks.
See docs/cli.md.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"walstore: {message} (see `{self.prog} --help`)\n")


# -- info, log ---------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> tuple[int, Any, list[str]]:
    layout = _inspect.Layout.of(args.root)
    d = _info.info(layout)
    lock = d["lock"]
    if lock["held"]:
        use = text.in_use(lock["pid"])
    else:
        use = "no" + (f" (last opened by pid {lock['pid']})" if lock["pid"] else "")
    segs = d["segments"]
    lines = [
        f"store       {d['root']}",
        f"in use      {use}",
        f"journal     {text.size(d['journal_bytes'])} in {len(segs)} segment(s)"
        + (f"; live {d['live_segment']}" if d["live_segment"] else " (never opened)"),
    ]
    if d["live_segment"]:
        lines.append(f"checkpoint  LSN {d['checkpoint_lsn']}; last commit LSN {d['last_lsn']}")
    lines.append(
        f"pending     {d['pending_transactions']} transaction(s) in {d['commit_groups']} commit "
        "group(s) since the checkpoint (committed, applied or to be replayed)"
    )
    if d["torn_tail_bytes"]:
        lines.append(f"tail        {d['torn_tail_bytes']} bytes after the last record")
    lines.append(
        f"staged      {text.size(d['staged_bytes'])} in {d['staging_transactions']} transaction "
        f"dir(s), {d['staging_other_entries']} other staging entr(ies)"
    )
    sp = d["space"]
    lines.append(
        f"free        {text.size(sp['free_bytes'])} of {text.size(sp['total_bytes'])}; reserve "
        f"{text.size(sp['reserve_bytes'])} (commits that write leave it free"
        + ("; the disk is FULL: they are refused, deletes still commit)" if sp["full"] else ")")
    )
    spare = (
        f"spare segment {text.size(sp['spare_segment_bytes'])} (the next checkpoint recycles it: "
        "no new space)"
        if sp["checkpoint_needs_bytes"] == 0
        else "no spare segment (the next checkpoint allocates one)"
    )
    lines.append(
        f"journal     {text.size(sp['live_segment_room_bytes'])} preallocated room left; {spare}"
    )
    return EXIT_OK, d, lines


def cmd_log(args: argparse.Namespace) -> tuple[int, Any, list[str]]:
    if args.since is not None and args.since < 0:
        raise _backup.UsageError(f"--since must be a txid (>= 0), not {args.since}")
    d = _info.log(_inspect.Layout.of(args.root), args.since)
    lines: list[str] = []
    if d["in_use_by"] is not None:
        lines.append(f"(store {text.in_use(d['in_use_by'])}: the journal is growing)")
    if not d["transactions"]:
        since = f" after txid {args.since}" if args.since is not None else ""
        lsn = d["checkpoint_lsn"]
        lines.append(f"no committed transactions{since} since the checkpoint (LSN {lsn})")
    for tx in d["transactions"]:
        lines.append(f"tx {tx['txid']}  lsn {tx['lsn']}  {len(tx['ops'])} op(s)")
        for op in tx["ops"]:
            lines += text.op_lines(op, "  ")
    return EXIT_OK, d, lines


# -- verify ------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> tuple[int, Any, list[str]]:
    layout = _inspect.Layout.of(args.root)
    with text.progress(args.json) as bar:
        r = _verify.verify(layout, bar)
    lines = [f"verify {r.root}"]
    if r.in_use_by is not None:
        lines.append(
            f"  {text.in_use(r.in_use_by)}: read without the lock; files of the commit in "
            "flight may be mid-apply and are not counted as problems"
        )
    if r.checkpoint_lsn is not None:
        lines.append(
            f"  journal: checkpoint LSN {r.checkpoint_lsn}, {r.transactions} transaction(s) since"
        )
    lines.append(f"  staged values checked: {r.staged_checked}; paths checked: {r.paths_checked}")
    lines += [f"  note: {n}" for n in r.notes]
    lines += [f"PROBLEM {p.line()}" for p in r.problems]
    if r.problems:
        lines.append(f"{len(r.problems)} problem(s) found")
        code = EXIT_PROBLEMS
    elif r.incomplete:
        lines.append("INCOMPLETE: the store kept checkpointing; nothing wrong was seen")
        code = EXIT_FAILED
    else:
        lines.append("OK: the journal, the staged values and the files agree")
        code = EXIT_OK
    return code, r.as_json(), lines


# -- recover, checkpoint -----------------------------------------------------------------------


async def _open_and(root: str, checkpoint: bool) -> tuple[dict[str, Any], bool]:
    async with _open.open(root, create=False) as store:
        rec = text.report_dict(store.recovery)
        if checkpoint:
            await store.checkpoint()
    return rec, checkpoint


def cmd_recover(args: argparse.Namespace) -> tuple[int, Any, list[str]]:
    layout = _inspect.Layout.of(args.root)
    if args.dry_run:
        d = _info.recovery_plan(layout)
        d["dry_run"] = True
        lines = [f"recover --dry-run {d['root']} (nothing was changed)"]
        if d["in_use_by"] is not None:
            lines.append(
                f"  {text.in_use(d['in_use_by'])}: this is what opening it would do if that "
                "process stopped now"
            )
        return EXIT_OK, d, lines + text.report_lines(d, "plan")
    lock = _inspect.probe_lock(layout)
    if lock.held:  # the processes that have it open recover it as they go
        raise StoreLockedError(
            f"store {layout.root} is {text.in_use(lock.pid)}: recover runs on a store no process "
            "has open (the processes sharing it finish what a dead one left, as they go)"
        )
    rec, _ = anyio.run(_open_and, layout.root, False)
    d = {"root": layout.root, "dry_run": False, **rec}
    return EXIT_OK, d, [f"recovered {layout.root}", *text.report_lines(d, "done")]


def cmd_checkpoint(args: argparse.Namespace) -> tuple[int, Any, list[str]]:
    layout = _inspect.Layout.of(args.root)
    before = _info.info(layout)
    if before["lock"]["held"] and not before["lock"]["processes"]:
        raise StoreLockedError(
            f"store {layout.root} is locked by another process (pid {before['lock']['pid']}, "
            "which opened it exclusive)"
        )
    # Beside processes that share the store: it opens as one more of them, and takes the
    # checkpoint in its turn under the commit lock.
    rec, _ = anyio.run(_open_and, layout.root, True)
    after = _info.info(layout)
    d = {
        "root": layout.root,
        "recovery": rec,
        "checkpoint_lsn_before": before["checkpoint_lsn"],
        "checkpoint_lsn": after["checkpoint_lsn"],
        "transactions_made_durable": before["pending_transactions"],
        "journal_bytes_before": before["journal_bytes"],
        "journal_bytes": after["journal_bytes"],
        "staged_bytes_before": before["staged_bytes"],
        "staged_bytes": after["staged_bytes"],
    }
    lines = [f"checkpoint {layout.root}"]
    if not rec["clean"]:
        lines += [
            "  the open recovered first:",
            *("  " + x for x in text.report_lines(rec, "done")),
        ]
    lines.append(
        f"  {d['transactions_made_durable']} transaction(s) made durable in place; checkpoint "
        f"LSN {d['checkpoint_lsn_before']} -> {d['checkpoint_lsn']}; journal "
        f"{text.size(d['journal_bytes_before'])} -> {text.size(d['journal_bytes'])}; staged "
        f"{text.size(d['staged_bytes_before'])} -> {text.size(d['staged_bytes'])}"
    )
    return EXIT_OK, d, lines


# -- backup ------------------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> tuple[int, Any, list[str]]:
    with text.progress(args.json) as bar:
        r = _backup.backup(args.root, args.dest, keep=args.keep, copy=args.copy, progress=bar)
    lines = [
        f"backup of {r.root}",
        f"  -> {r.path}",
        f"  {r.linked} file(s) hard-linked, {r.copied} copied ({text.size(r.copied_bytes)}); "
        f"journal {text.size(r.journal_bytes)} with {r.transactions} transaction(s) after "
        f"checkpoint LSN {r.checkpoint_lsn}",
        f"  consistent on attempt {r.attempts}"
        + (f" (the store was {text.in_use(r.in_use_by)})" if r.in_use_by is not None else ""),
    ]
    if r.skipped:
        lines.append(f"  skipped {len(r.skipped)} special file(s): {', '.join(r.skipped[:5])}")
    lines.append("  restore: open that directory as a store; its recovery replays the journal")
    if args.keep is not None:
        lines.append(
            f"  --keep {args.keep}: pruned {len(r.pruned)} older backup(s)"
            + (f": {', '.join(r.pruned)}" if r.pruned else "")
        )
    return EXIT_OK, r.as_json(), lines


# -- main --------------------------------------------------------------------------------------


def _parser() -> _Parser:
    parser = _Parser(
        prog="walstore",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )

    p = add(
        "info",
        "journal size, segments, checkpoint, pending transactions, staged bytes, lock holder",
        parents=[common],
    )
    p.add_argument("root", metavar="ROOT")
    p = add(
        "log", "committed transactions since the last checkpoint, with their ops", parents=[common]
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--since", type=int, metavar="TXID", help="only transactions after TXID")
    p = add(
        "verify",
        "check the journal, staged values and files against each other (read-only)",
        parents=[common],
    )
    p.add_argument("root", metavar="ROOT")
    p = add(
        "recover",
        "open the store, which recovers it, and say what was rolled forward and back",
        parents=[common],
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only say what recovery would do; change nothing, take no lock",
    )
    p = add("checkpoint", "open the store, checkpoint it, close it", parents=[common])
    p.add_argument("root", metavar="ROOT")
    p = add(
        "backup",
        "consistent online snapshot into DEST/walstore-backup-<seq>-<time>",
        parents=[common],
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("dest", metavar="DEST")
    p.add_argument(
        "--keep",
        type=int,
        metavar="N",
        help="then remove all but the N newest backups in DEST (only ours)",
    )
    p.add_argument("--copy", action="store_true", help="copy every file instead of hard-linking it")
    p = add("demo", "run the crash-and-recover demo in DIR")
    p.add_argument("dir")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--acks", type=int, default=40, help="transfers to wait for per round")
    p = sub.add_parser("_demo-child")
    p.add_argument("root")
    p.add_argument("first", type=int)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], tuple[int, Any, list[str]]]] = {
    "info": cmd_info,
    "log": cmd_log,
    "verify": cmd_verify,
    "recover": cmd_recover,
    "checkpoint": cmd_checkpoint,
    "backup": cmd_backup,
}


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, StoreLockedError):
        return EXIT_LOCKED
    if isinstance(exc, _backup.UsageError):
        return EXIT_USAGE
    if isinstance(exc, StoreFailedError | _backup.BackupError | OSError):
        return EXIT_FAILED
    if isinstance(exc, StoreError):  # not a store, CorruptionError, ...
        return EXIT_PROBLEMS
    return EXIT_FAILED


def _message(exc: BaseException) -> str:
    if isinstance(exc, CorruptionError):
        return f"journal damaged: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, StoreError | _backup.UsageError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    json_out: bool = getattr(args, "json", False)
    try:
        if args.command == "demo":
            return _demo.demo(args.dir, args.rounds, args.acks)
        if args.command == "_demo-child":
            anyio.run(_demo.child, args.root, args.first)
            return 0
        code, doc, lines = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("WALSTORE_DEBUG"):
            raise
        code = _exit_code(exc)
        message = " ".join(_message(exc).split())  # one line, whatever the message holds
        print(f"walstore: {text.escape(message)}", file=sys.stderr)
        if json_out:
            print(json.dumps({"error": message, "exit_code": code}))
        return code
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(map(text.escape, lines)))
    return code
