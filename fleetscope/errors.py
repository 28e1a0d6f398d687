"""Errors shared by the commands, importable without loading any driver."""

from __future__ import annotations

from typing import ClassVar


class StoreError(RuntimeError):
    """ClickHouse could not be reached or refused a statement."""

    retriable: ClassVar[bool] = True


class MigrationError(StoreError):
    """The migration history does not match the files; needs an operator."""

    retriable: ClassVar[bool] = False
