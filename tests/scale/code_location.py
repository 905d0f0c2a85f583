"""tda's code location as a zero-argument target, so that `execute_job` and its step processes rebuild it from the
environment of the test (storage root, executor) rather than from whatever `tda_assets.definitions.defs` was built with
when this test process first imported it."""

from dagster import Definitions

from tda_assets.definitions import build_definitions


def definitions() -> Definitions:
    """The Definitions of `tda_assets.definitions` from the environment as it is now (TDA_STORAGE_URL, TDA_EXECUTOR, …)."""
    return build_definitions()
