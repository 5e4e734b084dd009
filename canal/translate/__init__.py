"""Pure translation of a Snapshot into a DesiredState, full or incremental."""

from canal.translate.engine import Translator, snapshot_items, translate

__all__ = ["Translator", "snapshot_items", "translate"]
