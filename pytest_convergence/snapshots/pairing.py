"""Which tensor of one snapshot is which of another's, when their names differ.

Exporters and other frameworks rename weights (an ONNX export's ``val_6``, a Flax
``Dense_0/kernel``), store them in another axis order (a Linear weight as a MatMul operand, a
Dense kernel as (in, out)) and store equal tensors once (tied embeddings, layer norms still at
their initial ones). What survives all three is the dimensions and the values, so tensors are
paired, in this order:

1. by name, when both snapshots hold the name (with the same shape: a name whose shape differs
   is a different architecture, not a renaming, and is never paired);
2. by values: tensors whose values are exactly equal, in the same or another axis order, are
   one *value group*; in a group, A's and B's unpaired tensors pair one to one, and those one
   snapshot holds more of are duplicates of a paired tensor of theirs, counted once;
3. by dimensions: where one tensor (or group of equal tensors) of each snapshot is left with
   some dimensions, in any axis order, they are paired, in the same layout when their shapes
   are equal.

Whatever is left is unpaired, with the reason: nothing on the other side has its dimensions, or
several tensors share the dimensions and their values do not tell which is which. Nothing is
loaded when every name is in both snapshots; otherwise each tensor is loaded once to learn its
shape and a checksum of its values, and again only to confirm that two tensors with equal
checksums are equal (tensors up to 1 MiB are kept from the first load for that, 64 MiB in
all).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch

__all__ = [
    "DuplicateTensor",
    "SnapshotPairing",
    "TensorPair",
    "UnpairedTensors",
    "pair_tensors",
]

Side = Literal["A", "B"]
# Axis orders are tried up to this many dimensions (6! = 720 permutations); beyond it, only the
# stored order.
_MAX_PERMUTED_DIMS = 6
# Elements turned to float64 at a time for a checksum, so a large tensor is never copied whole.
_CHUNK = 1 << 22
# Small tensors read for their checksums are kept for the comparisons that follow: many biases
# and norms of one value (zeros, ones) are each compared once more, and a lazy snapshot reads
# a tensor again from its file each time (a safetensors or .npz file's index each time too).
_KEPT_TENSOR_BYTES = 1 << 20
_KEPT_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorPair:
    """A tensor of A and the tensor of B that holds the same weights.

    ``paired_by`` is ``"name"``, ``"values"`` (exactly equal) or ``"dimensions"`` (the only
    ones left with them); ``axes`` is the permutation that puts A's tensor in B's layout
    (``a.permute(axes)``), None when the layouts are the same.
    """

    name_a: str
    name_b: str
    paired_by: Literal["name", "values", "dimensions"]
    axes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class DuplicateTensor:
    """A tensor exactly equal to another of the same snapshot that stands for it in a pair, so
    it is counted once: a tied weight, or one the other snapshot stores once."""

    side: Side
    name: str
    equal_to: str
    axes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class UnpairedTensors:
    """Tensors that could not be paired, and why (a sentence that names them)."""

    names_a: tuple[str, ...]
    names_b: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class SnapshotPairing:
    """The correspondence between two snapshots' tensors."""

    pairs: tuple[TensorPair, ...]
    duplicates: tuple[DuplicateTensor, ...] = ()
    unpaired: tuple[UnpairedTensors, ...] = ()

    @property
    def by_name(self) -> bool:
        """Every tensor paired with the tensor of its own name, as for two snapshots of one
        architecture from one framework."""
        return (
            not self.duplicates
            and not self.unpaired
            and all(pair.paired_by == "name" for pair in self.pairs)
        )


def pair_tensors(
    first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]
) -> SnapshotPairing:
    """Pair the tensors of ``first`` (A) with those of ``second`` (B); see the module's text for
    the rules. Pairs come in A's order."""
    if set(first) == set(second):
        return SnapshotPairing(tuple(TensorPair(name, name, "name") for name in first))
    kept: dict[tuple[Side, str], torch.Tensor] = {}
    signatures_a, signatures_b = _signatures(first, "A", kept), _signatures(second, "B", kept)
    return _Pairing(signatures_a, signatures_b, first, second, kept).result()


@dataclass(frozen=True)
class _Member:
    """What pairing knows of a tensor without holding it."""

    side: Side
    name: str
    shape: tuple[int, ...]
    checksum: int
    order: int  # position in its snapshot, so that results follow the files' order

    @property
    def key(self) -> tuple[Side, str]:
        return (self.side, self.name)

    @property
    def dims(self) -> tuple[int, ...]:
        """The dimensions in any order: what a change of layout keeps."""
        return tuple(sorted(self.shape))


_SIDES: tuple[tuple[Side, Side], ...] = (("A", "B"), ("B", "A"))
# Tensors with exactly equal values, the first standing for the others.
_Group: TypeAlias = "list[_Member]"


def _signatures(
    tensors: Mapping[str, torch.Tensor], side: Side, kept: dict[tuple[Side, str], torch.Tensor]
) -> dict[str, _Member]:
    """Each tensor's shape and checksum, loading one tensor at a time; small ones are kept in
    ``kept`` (up to a budget), since equal values are confirmed by loading them again."""
    members = {}
    budget = _KEPT_BYTES - sum(t.numel() * t.element_size() for t in kept.values())
    for order, name in enumerate(tensors):
        tensor = tensors[name]
        members[name] = _Member(side, name, tuple(tensor.shape), _checksum(tensor), order)
        size = tensor.numel() * tensor.element_size()
        if size <= min(_KEPT_TENSOR_BYTES, budget):
            kept[(side, name)] = tensor
            budget -= size
        del tensor
    return members


def _checksum(tensor: torch.Tensor) -> int:
    """The sum of the float64 bit patterns of the values, wrapped to 64 bits.

    Integer addition does not depend on the order, so the checksum is the same in every axis
    order; equal checksums are confirmed by comparing the values.
    """
    flat = tensor.detach().reshape(-1)
    total = 0
    for start in range(0, flat.numel(), _CHUNK):
        # Adding 0.0 turns -0.0 into 0.0, which compare equal.
        piece = flat[start : start + _CHUNK].to(torch.float64) + 0.0
        total += int(piece.view(torch.int64).sum())
    return total % (1 << 64)


def _layouts(shape_a: Sequence[int], shape_b: Sequence[int]) -> list[tuple[int, ...]]:
    """The axis orders that give A's shape B's, the stored order first."""
    if len(shape_a) != len(shape_b) or sorted(shape_a) != sorted(shape_b):
        return []
    identity = tuple(range(len(shape_a)))
    if len(shape_a) > _MAX_PERMUTED_DIMS:
        return [identity] if tuple(shape_a) == tuple(shape_b) else []
    return [
        axes
        for axes in itertools.permutations(identity)
        if tuple(shape_a[axis] for axis in axes) == tuple(shape_b)
    ]


def _equal_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...] | None:
    """The axis order in which ``a`` equals ``b`` value for value, if there is one."""
    if a.dtype != b.dtype:
        a, b = a.to(torch.float64), b.to(torch.float64)
    for axes in _layouts(a.shape, b.shape):
        if torch.equal(a.permute(axes), b):
            return axes
    return None


def _changed(axes: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """None for the stored order, so that an unchanged layout reads as no change."""
    return None if axes is None or axes == tuple(range(len(axes))) else axes


class _Pairing:
    """One pairing of two snapshots' tensors: names first, then values, then dimensions."""

    def __init__(
        self,
        signatures_a: dict[str, _Member],
        signatures_b: dict[str, _Member],
        first: Mapping[str, torch.Tensor],
        second: Mapping[str, torch.Tensor],
        kept: dict[tuple[Side, str], torch.Tensor],
    ) -> None:
        self.kept = kept
        self.signatures: dict[Side, dict[str, _Member]] = {"A": signatures_a, "B": signatures_b}
        self.tensors: dict[Side, Mapping[str, torch.Tensor]] = {"A": first, "B": second}
        self.paired: dict[Side, set[str]] = {"A": set(), "B": set()}
        self.layouts: dict[tuple[Side, str], tuple[int, ...]] = {}
        self.pairs: list[tuple[int, TensorPair]] = []
        self.duplicates: list[tuple[Side, int, DuplicateTensor]] = []
        self.unpaired: list[tuple[int, UnpairedTensors]] = []

    def result(self) -> SnapshotPairing:
        self._pair_by_name()
        classes: dict[tuple[int, ...], list[_Member]] = defaultdict(list)
        for side in ("A", "B"):
            for member in self.signatures[side].values():
                classes[member.dims].append(member)
        for members in classes.values():
            if not all(member.name in self.paired[member.side] for member in members):
                self._pair_class(members)
        return SnapshotPairing(
            tuple(pair for _, pair in sorted(self.pairs, key=lambda item: item[0])),
            tuple(d for *_, d in sorted(self.duplicates, key=lambda item: item[:2])),
            tuple(u for _, u in sorted(self.unpaired, key=lambda item: item[0])),
        )

    def _tensor(self, member: _Member) -> torch.Tensor:
        kept = self.kept.get(member.key)
        return self.tensors[member.side][member.name] if kept is None else kept

    def _between(self, member: _Member, other: _Member) -> tuple[int, ...]:
        """The axis order that gives ``member``'s values ``other``'s layout, for two members of
        one value group: each is its group's first, permuted by its recorded layout."""
        first, second = self.layouts[member.key], self.layouts[other.key]
        inverse = [0] * len(first)
        for position, axis in enumerate(first):
            inverse[axis] = position
        return tuple(inverse[axis] for axis in second)

    def _pair_by_name(self) -> None:
        signatures_b = self.signatures["B"]
        for name, a in self.signatures["A"].items():
            b = signatures_b.get(name)
            if b is None:
                continue
            self.paired["A"].add(name)
            self.paired["B"].add(name)
            if a.shape == b.shape:
                self.pairs.append((a.order, TensorPair(name, name, "name")))
            else:
                reason = f"{name!r} has shape {list(a.shape)} vs {list(b.shape)}"
                self.unpaired.append((a.order, UnpairedTensors((name,), (name,), reason)))

    def _pair_class(self, members: list[_Member]) -> None:
        """Tensors with the same dimensions in some order: by values, then by dimensions.

        In a group of equal values, unpaired tensors of A and of B pair one to one (both hold
        that many copies); those left over on one side are duplicates of a paired tensor of
        their side, or, when their side has none, one group still to pair by dimensions.
        """
        left: dict[Side, list[_Group]] = {"A": [], "B": []}
        for group in self._value_groups(members):
            free: dict[Side, _Group] = {
                side: [m for m in group if m.side == side and m.name not in self.paired[side]]
                for side, _ in _SIDES
            }
            for a, b in zip(free["A"], free["B"], strict=False):
                self._add_pair(a, b, "values", self._between(a, b))
            for side, other in _SIDES:
                rest = free[side][len(free[other]) :]
                kept = next((m for m in group if m.side == side and m not in rest), None)
                if kept is not None:
                    self._add_duplicates(kept, rest)
                elif rest:
                    left[side].append(rest)
        if len(left["A"]) == 1 and len(left["B"]) == 1:
            self._pair_by_dimensions(left["A"][0], left["B"][0])
        elif left["A"] or left["B"]:
            self._leave_unpaired(left["A"], left["B"])

    def _value_groups(self, members: list[_Member]) -> list[_Group]:
        """Members split by exactly equal values, in any axis order, recording each member's
        layout relative to its group's first.

        Only members whose checksums collide are loaded; while a checksum's members are
        compared, the first of each of its groups is held.
        """
        buckets: dict[int, list[_Member]] = defaultdict(list)
        for member in members:
            buckets[member.checksum].append(member)
        groups: list[_Group] = []
        for bucket in buckets.values():
            held: list[tuple[torch.Tensor, _Group]] = []
            for member in bucket:
                tensor = self._tensor(member) if len(bucket) > 1 else None
                for first, group in held:
                    axes = None if tensor is None else _equal_layout(first, tensor)
                    if axes is not None:
                        self.layouts[member.key] = axes
                        group.append(member)
                        break
                else:
                    self.layouts[member.key] = tuple(range(len(member.shape)))
                    groups.append([member])
                    if tensor is not None:
                        held.append((tensor, groups[-1]))
            del held
        return groups

    def _add_pair(
        self,
        a: _Member,
        b: _Member,
        paired_by: Literal["values", "dimensions"],
        axes: tuple[int, ...] | None,
    ) -> None:
        self.paired["A"].add(a.name)
        self.paired["B"].add(b.name)
        self.pairs.append((a.order, TensorPair(a.name, b.name, paired_by, _changed(axes))))

    def _pair_by_dimensions(self, group_a: _Group, group_b: _Group) -> None:
        a, b = group_a[0], group_b[0]
        layouts = _layouts(a.shape, b.shape)
        identity = tuple(range(len(a.shape)))
        # Equal shapes keep their layout: values equal in another order were paired already.
        if identity in layouts or len(layouts) == 1:
            self._add_pair(a, b, "dimensions", identity if identity in layouts else layouts[0])
            self._add_duplicates(a, group_a[1:])
            self._add_duplicates(b, group_b[1:])
        else:
            reason = (
                f"A's {a.name!r} {list(a.shape)} and B's {b.name!r} {list(b.shape)} are the only "
                f"tensors left with these dimensions, but they match in {len(layouts)} axis "
                "orders and their values are equal in none, so the layout cannot be told"
            )
            self._add_unpaired(group_a, group_b, reason)

    def _leave_unpaired(self, groups_a: list[_Group], groups_b: list[_Group]) -> None:
        members_a = sorted((m for group in groups_a for m in group), key=lambda m: m.order)
        members_b = sorted((m for group in groups_b for m in group), key=lambda m: m.order)
        dims = (members_a or members_b)[0].dims
        shape = f"dimensions {' x '.join(map(str, dims))}"
        if members_a and members_b:
            reason = (
                f"A's {_quoted(members_a)} and B's {_quoted(members_b)} "
                + (f"all have {shape} in some axis order" if dims else "are all scalars")
                + ", and none of A's has values equal to one of B's, so which is which cannot "
                "be told"
            )
        elif members_a:
            reason = (
                f"A's {_quoted(members_a)}: no tensor of B is left "
                + (f"with {shape} in any axis order" if dims else "that is a scalar")
                + " (an exporter may have folded them into another tensor, as a batch norm "
                "into a convolution, or dropped them)"
            )
        else:
            reason = (
                f"B's {_quoted(members_b)}: no tensor of A is left "
                + (f"with {shape} in any axis order" if dims else "that is a scalar")
                + " (an exporter's graph constants, or weights A does not hold)"
            )
        self._add_unpaired(members_a, members_b, reason)

    def _add_duplicates(self, kept: _Member, duplicates: Sequence[_Member]) -> None:
        for member in duplicates:
            self.paired[member.side].add(member.name)
            axes = _changed(self._between(kept, member))
            duplicate = DuplicateTensor(member.side, member.name, kept.name, axes)
            self.duplicates.append((member.side, member.order, duplicate))

    def _add_unpaired(
        self, members_a: Sequence[_Member], members_b: Sequence[_Member], reason: str
    ) -> None:
        order = min(member.order for member in (members_a or members_b))
        names_a = tuple(member.name for member in members_a)
        names_b = tuple(member.name for member in members_b)
        # B's leftovers after A's: the report reads in A's order first.
        key = order if members_a else len(self.signatures["A"]) + order
        self.unpaired.append((key, UnpairedTensors(names_a, names_b, reason)))


def _quoted(members: Sequence[_Member]) -> str:
    return ", ".join(repr(member.name) for member in members)
