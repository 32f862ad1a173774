"""``walstore.__all__`` lists exactly the public names, and each is documented (httpx's
test_exported_members)."""

from __future__ import annotations

import pickle
import re
import textwrap
import traceback

import walstore


def test_all_is_honest() -> None:
    # "@py_builtins"/"@pytest_ar": pytest rewrites the asserts of a plugin's whole
    # distribution (walstore ships one, the pytest11 entry point) and leaves these behind
    public = {name for name in dir(walstore) if not name.startswith(("_", "@"))}
    # imported on demand, not re-exported (pytest loads pytest_plugin through its entry point)
    submodules = {"testing", "pytest_plugin"}
    assert set(walstore.__all__) - {"__version__"} == public - submodules
    for name in walstore.__all__:
        if name != "__version__":
            assert getattr(walstore, name).__doc__, f"{name} has no docstring"


def test_error_tree() -> None:
    """The tree drawn in walstore/_errors.py and docs/api.md."""
    assert issubclass(walstore.InvalidPathError, ValueError)
    for err in (
        walstore.StoreLockedError,
        walstore.StoreClosedError,
        walstore.StoreReadOnlyError,
        walstore.NotAStoreError,
        walstore.StoreLayoutError,
        walstore.StoreMisuseError,
        walstore.StoreFailedError,
        walstore.CorruptionError,
        walstore.InvalidPathError,
        walstore.TransactionError,
    ):
        assert err.__bases__ == (walstore.StoreError,) or err is walstore.InvalidPathError
    for err in (walstore.CommitOutcomeUnknownError, walstore.CommittedNotAppliedError):
        assert err.__bases__ == (walstore.StoreFailedError,)
    for err in (
        walstore.ConflictError,
        walstore.TransactionClosedError,
        walstore.TransactionBusyError,
    ):
        assert err.__bases__ == (walstore.TransactionError,)
    # Neither split case is the other: a caller can tell "maybe committed" from "committed".
    assert not issubclass(walstore.CommitOutcomeUnknownError, walstore.CommittedNotAppliedError)
    assert not issubclass(walstore.CommittedNotAppliedError, walstore.CommitOutcomeUnknownError)


ERRORS = sorted(
    name
    for name in walstore.__all__
    if isinstance(getattr(walstore, name), type)
    and issubclass(getattr(walstore, name), BaseException)
)


def drawn_tree(text: str) -> dict[str, str]:
    """Each class in the tree drawn in ``text`` (the first block of lines starting at
    ``StoreError``) and the parent it is drawn under."""
    start = text.rindex("\n", 0, text.index("StoreError\n")) + 1
    lines = textwrap.dedent(text[start:].split("\n\n", 1)[0]).splitlines()
    parents: dict[str, str] = {}
    stack: list[str] = []
    for line in lines:
        m = re.match(r"((?:[│ ]   )*)(?:[├└]── )?(\w+)", line)
        assert m, line
        depth = len(m.group(1)) // 4 + (1 if "── " in line else 0)
        del stack[depth:]
        if stack:
            parents[m.group(2)] = stack[-1]
        stack.append(m.group(2))
    return parents


def test_every_error_is_exported_and_drawn_where_it_inherits() -> None:
    """Each exception class walstore._errors defines is public, and the tree drawn in its
    docstring puts each under the class it inherits from."""
    from walstore import _errors

    defined = {
        name
        for name, obj in vars(_errors).items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    assert defined == set(ERRORS)
    drawn = drawn_tree(_errors.__doc__ or "")
    assert set(drawn) | {"StoreError"} == set(ERRORS)
    for name, parent in drawn.items():
        assert getattr(walstore, name).__bases__[0].__name__ == parent, name


def test_every_error_names_the_public_module() -> None:
    """As trio's and anyio's do: tracebacks and reprs say walstore.X, and a pickled error
    names a module that keeps it."""
    assert len(ERRORS) >= 16
    for name in ERRORS:
        err = getattr(walstore, name)
        assert err.__module__ == "walstore", name
        assert f"{err.__module__}.{err.__qualname__}" == f"walstore.{name}"
    exc = pickle.loads(pickle.dumps(walstore.CommittedNotAppliedError("committed (LSN 7)")))
    assert type(exc) is walstore.CommittedNotAppliedError and str(exc) == "committed (LSN 7)"
    line = traceback.format_exception_only(walstore.StoreReadOnlyError("readonly"))[-1]
    assert line == "walstore.StoreReadOnlyError: readonly\n"


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert walstore.__version__ == version("walstore")
    assert walstore.__version__[0].isdigit()
