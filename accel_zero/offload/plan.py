"""Sub-groups: how a rank's optimizer state is cut into swap records (DESIGN D6).

The optimizer steps each parameter's real rows on this rank (``Unit.slot_master``). For
NVMe swapping those rows are cut, at row boundaries, into :class:`Piece`\\ s, and
consecutive pieces are packed into :class:`SubGroup`\\ s of at most ``sub_group_size``
elements (DeepSpeed's key): one sub-group is one swap record holding its pieces' fp32
masters and Adam moments side by side, read, stepped and written back as a whole. A
parameter larger than a sub-group spans several; a row larger than a sub-group is a piece
of its own (rows are never split, so every piece is a row range a checkpoint can name).

Pure bookkeeping: no tensors, no IO.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Piece", "SlotRows", "SubGroup", "plan_sub_groups"]


@dataclass(frozen=True, kw_only=True)
class SlotRows:
    """What the planner needs of one parameter on this rank."""

    unit: int
    slot: int
    rows: int
    """Real rows this rank owns (may be 0)."""
    row_numel: int


@dataclass(frozen=True, kw_only=True)
class Piece:
    """Rows ``[row_start, row_end)`` of this rank's rows of one parameter, at ``offset``
    elements into its sub-group's record."""

    unit: int
    slot: int
    row_start: int
    row_end: int
    row_numel: int
    offset: int

    @property
    def numel(self) -> int:
        return (self.row_end - self.row_start) * self.row_numel

    @property
    def elem_start(self) -> int:
        """First element of the piece in the parameter's flattened local rows."""
        return self.row_start * self.row_numel


@dataclass(kw_only=True)
class SubGroup:
    """Consecutive pieces swapped as one record."""

    index: int
    pieces: list[Piece] = field(default_factory=list)
    numel: int = 0

    @property
    def key(self) -> str:
        return f"opt/{self.index}"

    @property
    def grad_key(self) -> str:
        return f"grad/{self.index}"

    @property
    def units(self) -> list[int]:
        """Units with a piece here, in order, once each."""
        return list(dict.fromkeys(p.unit for p in self.pieces))


def plan_sub_groups(slots: Iterable[SlotRows], sub_group_size: int) -> list[SubGroup]:
    """Pack the slots' rows, in order, into sub-groups of at most ``sub_group_size`` elements
    (a single row larger than that becomes a sub-group of its own)."""
    if sub_group_size < 1:
        raise ValueError(f"sub_group_size must be >= 1, got {sub_group_size}")
    groups: list[SubGroup] = []
    current = SubGroup(index=0)
    for s in slots:
        row = 0
        while row < s.rows:
            room = sub_group_size - current.numel
            fit = min(s.rows - row, room // s.row_numel)
            if fit == 0:
                if current.numel:  # full: start the next sub-group
                    groups.append(current)
                    current = SubGroup(index=len(groups))
                    continue
                fit = 1  # one row larger than a whole sub-group
            piece = Piece(
                unit=s.unit,
                slot=s.slot,
                row_start=row,
                row_end=row + fit,
                row_numel=s.row_numel,
                offset=current.numel,
            )
            current.pieces.append(piece)
            current.numel += piece.numel
            row += fit
    if current.pieces:
        groups.append(current)
    return groups


def pieces_by_slot(groups: Sequence[SubGroup]) -> dict[tuple[int, int], list[tuple[int, Piece]]]:
    """(unit, slot) -> its pieces, with their sub-group index, in row order."""
    out: dict[tuple[int, int], list[tuple[int, Piece]]] = {}
    for g in groups:
        for p in g.pieces:
            out.setdefault((p.unit, p.slot), []).append((g.index, p))
    return out
