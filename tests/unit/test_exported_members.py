"""``walstore.__all__`` lists exactly the public names, and each is documented (httpx's
test_exported_members)."""

from __future__ import annotations

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
    assert issubclass(walstore.InvalidPathError, ValueError)
    for err in (
        walstore.StoreLockedError,
        walstore.StoreClosedError,
        walstore.StoreFailedError,
        walstore.CorruptionError,
        walstore.InvalidPathError,
        walstore.TransactionError,
    ):
        assert issubclass(err, walstore.StoreError)
    assert issubclass(walstore.ConflictError, walstore.TransactionError)
    assert issubclass(walstore.TransactionClosedError, walstore.TransactionError)


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert walstore.__version__ == version("walstore")
    assert walstore.__version__[0].isdigit()
