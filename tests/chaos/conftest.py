"""The in-process partition tests run on the collectives tests' mock clock,
which also checks one view per revision."""

from tests.collectives.conftest import mock_clock, one_view_per_revision

__all__ = ["mock_clock", "one_view_per_revision"]
