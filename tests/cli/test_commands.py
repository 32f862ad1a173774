"""Each command of ``walstore`` on a real store: output, --json and exit codes, including
deliberately damaged stores for ``verify`` and ``recover``, and a store another process has
open (the read-only commands must work and touch nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

import walstore
from walstore import _inspect
from walstore._journal_format import HEADER_SIZE
from walstore._journal_reader import scan_segment

from .helpers import (
    Holder,
    crashed_store,
    one_line_error,
    run_cli,
    run_in_process,
    tree_state,
    user_files,
)

Cap = pytest.CaptureFixture[str]

# HEADER (9 + 22 bytes) and CHECKPOINT (9 + 16) open every segment; COMMIT records follow.
FIRST_COMMIT = 2 * HEADER_SIZE + 22 + 16


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return crashed_store(tmp_path / "s")


def live_segment(root: Path) -> Path:
    (seg,) = sorted(p for p in (root / ".walstore" / "journal").iterdir() if p.name != "spare")
    return seg


def flip(path: Path, offset: int) -> None:
    """Change one byte in place (the same inode: a hard link sees it too)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


# -- info and log --------------------------------------------------------------------------------


def test_info_reports_the_journal_staging_and_last_opener(store: Path, capsys: Cap) -> None:
    r = run_in_process(capsys, "info", str(store), "--json")
    assert r.code == 0 and r.err == ""
    d = r.json()
    assert d["pending_transactions"] == 4 and d["pending_txids"] == [2, 3, 4, 5]
    assert d["commit_groups"] == 4 and d["checkpoint_lsn"] == 3 and d["last_lsn"] == 7
    assert [s["name"] for s in d["segments"]] == [d["live_segment"]] == [live_segment(store).name]
    assert d["journal_bytes"] == live_segment(store).stat().st_size
    staging = store / ".walstore" / "staging"
    staged = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    assert d["staged_bytes"] == staged > 3000
    assert d["lock"]["held"] is False and d["in_use_by"] is None
    assert isinstance(d["lock"]["pid"], int)  # the crashed writer's pid, left in LOCK

    human = run_in_process(capsys, "info", str(store))
    assert human.code == 0
    assert "pending     4 transaction(s) in 4 commit group(s)" in human.out
    assert f"in use      no (last opened by pid {d['lock']['pid']})" in human.out


def test_log_lists_transactions_and_ops_since_the_checkpoint(store: Path, capsys: Cap) -> None:
    d = run_in_process(capsys, "log", str(store), "--json").json()
    txs = {
        t["txid"]: [(o["kind"], o["path"], o["size"]) for o in t["ops"]] for t in d["transactions"]
    }
    assert txs == {
        2: [
            ("put", "docs/a.txt", 8),
            ("put-staged", "blobs/big2.bin", 3000),
            ("delete", "old.txt", None),
        ],
        3: [
            ("put-staged", "archive/a.txt", 8),
            ("delete", "docs/a.txt", None),
            ("delete-dir", "tree", None),
        ],
        4: [("replace-dir", "conv/c1", txs[4][0][2])],
        5: [("put", "docs/b.txt", 5)],
    }
    (replace,) = d["transactions"][2]["ops"]
    assert {e["path"] for e in replace["entries"]} == {"events.json", "QUERY.md"}

    since = run_in_process(capsys, "log", str(store), "--since", "3", "--json").json()
    assert [t["txid"] for t in since["transactions"]] == [4, 5]

    human = run_in_process(capsys, "log", str(store), "--since", "4")
    assert human.code == 0
    assert human.out.splitlines() == ["tx 5  lsn 7  1 op(s)", "  put          docs/b.txt  5 B"]
    none = run_in_process(capsys, "log", str(store), "--since", "5")
    assert none.out.startswith("no committed transactions after txid 5")


# -- verify --------------------------------------------------------------------------------------


def test_verify_passes_an_intact_store_and_touches_nothing(store: Path, capsys: Cap) -> None:
    before = tree_state(store)
    r = run_in_process(capsys, "verify", str(store))
    assert r.code == 0, r.out
    assert r.out.rstrip().endswith("OK: the journal, the staged values and the files agree")
    d = run_in_process(capsys, "verify", str(store), "--json").json()
    assert d["ok"] and d["problems"] == []
    assert d["staged_checked"] == 4  # big2.bin, the moved a.txt, events.json, the kept QUERY.md
    assert d["paths_checked"] == 9
    for argv in (["info"], ["log"], ["recover", "--dry-run"]):
        assert run_in_process(capsys, *argv, str(store)).code == 0
    assert tree_state(store) == before


def test_verify_names_each_problem_on_its_own_line(store: Path) -> None:
    flip(store / ".walstore" / "staging" / "2" / "0", 100)  # a staged value (big2.bin)
    (store / "docs" / "b.txt").write_text("changed after commit")
    (store / "old.txt").write_text("deleted, yet back")
    (store / "conv" / "c1" / "stray.txt").write_text("not in the replaced directory")
    (store / "tree").mkdir()  # a deleted directory, back
    r = run_cli("verify", str(store))
    assert r.code == 1, r.out + r.err
    problems = [line for line in r.out.splitlines() if line.startswith("PROBLEM ")]
    assert len(problems) == 5, r.out
    assert any(
        p.startswith("PROBLEM staged: .walstore/staging/2/0: CRC") and "transaction 2" in p
        for p in problems
    )
    assert any(p.startswith("PROBLEM file: docs/b.txt: ") for p in problems)
    assert any(p.startswith("PROBLEM file: old.txt: exists, but was deleted") for p in problems)
    assert any(
        p.startswith("PROBLEM file: conv/c1/stray.txt: not in the directory") for p in problems
    )
    assert any(p.startswith("PROBLEM dir: tree: exists, but was deleted") for p in problems)
    assert r.out.rstrip().endswith("5 problem(s) found")
    d = json.loads(run_cli("verify", str(store), "--json").out)
    assert not d["ok"] and len(d["problems"]) == 5
    assert {p["path"] for p in d["problems"]} == {
        ".walstore/staging/2/0", "docs/b.txt", "old.txt", "conv/c1/stray.txt", "tree"
    }  # fmt: skip


def test_verify_names_a_directory_swapped_for_a_symlink(store: Path, tmp_path: Path) -> None:
    """Another process replaced ``docs/`` with a symlink to a copy outside the store: verify
    names the symlink instead of checking (and reporting on) what lies behind it."""
    outside = tmp_path / "outside-docs"
    (store / "docs").rename(outside)
    (store / "docs").symlink_to(outside)
    r = run_cli("verify", str(store))
    assert r.code == 1, r.out + r.err
    problems = [line for line in r.out.splitlines() if line.startswith("PROBLEM ")]
    assert problems and all("behind the symlink 'docs'" in p for p in problems), r.out
    assert all(p.startswith("PROBLEM file: docs/") for p in problems), r.out


def test_verify_finds_a_missing_staged_value_and_a_same_size_change(
    store: Path, capsys: Cap
) -> None:
    (store / ".walstore" / "staging" / "4" / "k0-0").unlink()  # the kept QUERY.md
    # Same size, new inode: only the content (CRC) tells.
    (store / "docs" / "b.txt").unlink()
    (store / "docs" / "b.txt").write_text("BRAVO")
    r = run_in_process(capsys, "verify", str(store))
    assert r.code == 1
    lines = [x for x in r.out.splitlines() if x.startswith("PROBLEM")]
    assert lines == [
        "PROBLEM staged: .walstore/staging/4/k0-0: missing (value of 'QUERY.md', transaction 4)",
        lines[1],
    ]
    assert lines[1].startswith("PROBLEM file: docs/b.txt: content differs from the committed value")


def test_verify_and_recover_report_mid_journal_corruption_in_one_line(
    store: Path, capsys: Cap
) -> None:
    flip(live_segment(store), FIRST_COMMIT + 20)  # damage followed by valid records
    v = run_in_process(capsys, "verify", str(store))
    assert v.code == 1
    (problem,) = [x for x in v.out.splitlines() if x.startswith("PROBLEM")]
    assert problem.startswith("PROBLEM journal: journal: journal segment ")
    assert "damaged record followed by a valid one" in problem
    before = tree_state(store)
    for argv in (["recover"], ["recover", "--dry-run"], ["info"], ["log"], ["checkpoint"]):
        r = run_in_process(capsys, *argv, str(store))
        assert r.code == 1, argv
        err = one_line_error(r)
        assert "journal damaged: journal segment" in err, err
        assert r.out == ""
    after = tree_state(store)
    del before[".walstore/LOCK"], after[".walstore/LOCK"]  # recover and checkpoint took it
    assert after == before  # refused, not "repaired"
    j = run_in_process(capsys, "recover", str(store), "--json")
    assert j.code == 1 and j.json()["exit_code"] == 1 and "journal damaged" in j.json()["error"]


@pytest.mark.parametrize("exclusive", [False, True], ids=["shared", "exclusive"])
def test_verify_while_another_process_holds_the_store(
    store: Path, capsys: Cap, exclusive: bool
) -> None:
    holder = Holder(store, exclusive=exclusive)
    try:
        before = tree_state(store)
        r = run_cli("verify", str(store))
        assert r.code == 0, r.out + r.err
        assert f"in use by pid {holder.pid}: read without the lock" in r.out
        info = run_in_process(capsys, "info", str(store), "--json").json()
        assert info["in_use_by"] == holder.pid and info["lock"]["held"]
        plan = run_in_process(capsys, "recover", "--dry-run", str(store))
        assert plan.code == 0 and f"in use by pid {holder.pid}" in plan.out
        assert run_in_process(capsys, "log", str(store)).code == 0
        assert tree_state(store) == before  # the holder is idle: nothing may have changed

        locked = run_cli("recover", str(store))
        assert locked.code == 3
        assert f"pid {holder.pid}" in one_line_error(locked)
        cp = run_in_process(capsys, "checkpoint", str(store))
        if exclusive:
            assert cp.code == 3 and f"pid {holder.pid}" in one_line_error(cp)
        else:  # one more process beside it, which checkpoints in its turn
            assert cp.code == 0 and "4 transaction(s) made durable in place" in cp.out, cp.out
            assert (
                run_in_process(capsys, "info", str(store), "--json").json()["pending_transactions"]
                == 0
            )
    finally:
        holder.stop()


# -- recover and checkpoint ----------------------------------------------------------------------


def test_recover_dry_run_predicts_what_recover_does(store: Path, capsys: Cap) -> None:
    seg = live_segment(store)
    end = scan_segment(seg.name, seg.read_bytes()).valid_end  # zeros after it: preallocated
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(b"\x30\x00\x00\x00\x99")  # a torn record header at the tail
    uncommitted = store / ".walstore" / "staging" / "900"
    uncommitted.mkdir()
    (uncommitted / "0").write_bytes(b"never committed" * 10)
    before = tree_state(store)
    plan = run_in_process(capsys, "recover", "--dry-run", str(store), "--json").json()
    assert tree_state(store) == before
    assert plan["dry_run"] and not plan["clean"]
    assert plan["rolled_forward"] == [2, 3, 4, 5] and plan["rolled_back"] == [900]
    assert plan["torn_bytes"] == 5

    r = run_in_process(capsys, "recover", str(store), "--json")
    assert r.code == 0
    done = r.json()
    for key in ("rolled_forward", "rolled_back", "torn_bytes", "segments_removed", "ops_replayed"):
        assert done[key] == plan[key], key
    assert done["orphans_removed"] >= plan["orphans_removed_at_least"] > 0
    assert not (store / ".walstore" / "staging" / "900").exists()

    again = run_in_process(capsys, "recover", str(store))
    assert again.out.splitlines() == [f"recovered {store}", "  clean: nothing to recover"]
    assert run_in_process(capsys, "recover", "--dry-run", str(store), "--json").json()["clean"]


def test_recover_reports_a_missing_staged_value_as_damage(store: Path) -> None:
    (store / ".walstore" / "staging" / "2" / "0").unlink()
    (store / "blobs" / "big2.bin").unlink()  # so nothing can stand in for it
    r = run_cli("recover", str(store))
    assert r.code == 1
    assert "staged value is missing" in one_line_error(r)


def test_recovered_store_equals_the_crashed_one(store: Path, capsys: Cap) -> None:
    files = user_files(store)
    r = run_in_process(capsys, "recover", str(store))
    assert r.code == 0
    assert "rolled forward 4 transaction(s): 2, 3, 4, 5" in r.out
    assert user_files(store) == files  # everything was applied before the crash
    assert set(files) == {
        "blobs/big.bin", "blobs/big2.bin", "archive/a.txt", "docs/b.txt",
        "conv/c1/events.json", "conv/c1/QUERY.md",
    }  # fmt: skip


def test_checkpoint_empties_the_journal(store: Path, capsys: Cap) -> None:
    r = run_in_process(capsys, "checkpoint", str(store), "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert d["transactions_made_durable"] == 4
    assert d["recovery"]["rolled_forward"] == [2, 3, 4, 5]  # the open recovered first
    assert d["checkpoint_lsn"] > d["checkpoint_lsn_before"] == 3
    assert d["staged_bytes"] == 0 < d["staged_bytes_before"]
    after = run_in_process(capsys, "info", str(store), "--json").json()
    assert after["pending_transactions"] == 0 and after["journal_bytes"] == d["journal_bytes"]
    human = run_in_process(capsys, "checkpoint", str(store))
    assert "0 transaction(s) made durable in place" in human.out
    assert "the open recovered first" not in human.out


def test_commands_on_a_store_written_through_the_api(tmp_path: Path, capsys: Cap) -> None:
    """A cleanly closed store: empty journal, every command succeeds."""

    async def make() -> None:
        async with walstore.open(tmp_path / "s") as s:
            await s.write_json("a.json", {"x": 1})

    anyio.run(make)
    root = str(tmp_path / "s")
    for argv in (["info"], ["log"], ["verify"], ["recover", "--dry-run"], ["recover"]):
        r = run_in_process(capsys, *argv, root, "--json")
        assert r.code == 0, (argv, r.err)
        json.loads(r.out)
    assert run_in_process(capsys, "recover", root, "--json").json()["clean"]


# -- bad input -----------------------------------------------------------------------------------


def test_bad_input_gets_one_line_and_a_documented_exit_code(tmp_path: Path, capsys: Cap) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path, words in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "is not a walstore store"),
        (tmp_path / "file", "is not a directory"),
    ]:
        for cmd in ("info", "log", "verify", "recover", "checkpoint"):
            r = run_in_process(capsys, cmd, str(path))
            assert r.code == 1, (cmd, path)
            assert words in one_line_error(r)
        r = run_in_process(capsys, "backup", str(path), str(tmp_path / "b"))
        assert r.code == 1 and words in one_line_error(r)
    assert not (tmp_path / "missing").exists()  # nothing created


def test_a_journal_that_never_holds_still_is_reported(
    store: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every scan lost a segment to a checkpoint under it: JournalBusyError, a problem
    reported in one line (exit 1), not an internal error."""

    def vanished(fs: object, layout: object) -> None:
        raise FileNotFoundError(2, "dropped by a checkpoint")

    monkeypatch.setattr(_inspect, "_read_journal_once", vanished)
    with pytest.raises(_inspect.JournalBusyError, match="kept changing"):
        _inspect.read_journal(_inspect.Layout.of(str(store)))
    r = run_in_process(capsys, "log", str(store))
    assert r.code == 1 and "kept changing while it was read" in one_line_error(r)


def test_usage_errors_exit_2_in_one_line(store: Path, tmp_path: Path, capsys: Cap) -> None:
    for argv in (["frobnicate"], ["info"], ["log", str(store), "--since", "soon"]):
        r = run_cli(*argv)  # argparse's own errors
        assert r.code == 2, (argv, r.out, r.err)
        one_line_error(r)
    for argv in (
        ["log", str(store), "--since", "-1"],
        ["backup", str(store), str(tmp_path / "b"), "--keep", "0"],
        ["backup", str(store), str(store / "backups")],  # inside the store
    ):
        r = run_in_process(capsys, *argv)
        assert r.code == 2, (argv, r.out, r.err)
        one_line_error(r)
    assert not (store / "backups").exists() and not (tmp_path / "b").exists()


def test_help_documents_the_exit_codes() -> None:
    r = run_cli("--help")
    assert r.code == 0
    for line in (
        "exit codes:",
        "  0  ok",
        "  1  problems found",
        "  2  bad usage",
        "  3  the store is locked",
        "  4  the work failed",
    ):
        assert line in r.out
    assert "exit codes:" in run_cli("verify", "--help").out


def test_docs_list_every_exit_code() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    from walstore import _cli

    codes = (_cli.EXIT_OK, _cli.EXIT_PROBLEMS, _cli.EXIT_USAGE, _cli.EXIT_LOCKED, _cli.EXIT_FAILED)
    for code in codes:
        assert f"| {code} |" in doc
    for cmd in ("info", "log", "verify", "recover", "checkpoint", "backup", "demo"):
        assert f"walstore {cmd}" in doc


def test_no_progress_bar_without_a_terminal(store: Path, tmp_path: Path) -> None:
    """stderr is a pipe here: nothing but errors may appear on it."""
    for argv in (["verify", str(store)], ["backup", str(store), str(tmp_path / "b")]):
        r = run_cli(*argv)
        assert r.code == 0 and r.err == "", r.err
