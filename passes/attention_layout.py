"""The layout algebra of the attention matcher: symbolic sizes, axis layouts and shape-tensor proofs.

Each tensor of a Q, K or V chain is described as a list of axes, each axis a list of *atoms*
(a role such as batch, sequence, heads or head size, and its size: an int or a product of
symbolic dims). :func:`reshape_layout` follows a Reshape; :class:`Proof` evaluates shape tensors
(constants and Shape/Gather/Slice/Concat/Unsqueeze chains) into terms. Symbolic dims are equal
only when they carry the same name (onnx inference's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from onnxopt.graph import GraphView, is_standard, opset_version
from onnxopt.passbase import PassContext
from onnxopt.passes.fusion_support import const_name
from onnxopt.passes.noop_rules import NoMatch, dims_of, get_attr, require

MAX_CONE = 64  # most nodes of one shape computation followed
SHAPE_OPS = frozenset({"Shape", "Gather", "Slice", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity", "Constant"})

# ----------------------------------------------------------------------------- symbolic sizes

Size = tuple[int, tuple[str, ...]]  # coefficient and sorted symbol names: 12 * batch * seq = (12, ("batch", "seq"))
Term = int | Size  # a shape-tensor element: a literal int (0 and -1 keep their Reshape meaning) or a symbolic size


def sized(term: Term) -> Size:
    """A term as a Size (literal ints become coefficients)."""
    return (term, ()) if isinstance(term, int) else term


def product(sizes: list[Size]) -> Size:
    """The product of sizes."""
    coef, syms = 1, []
    for c, s in sizes:
        coef *= c
        syms.extend(s)
    return coef, tuple(sorted(syms))


def term(size: Size) -> Term:
    """A Size back as a term (an int when it has no symbols)."""
    return size[0] if not size[1] else size


def divides(part: Size, whole: Size) -> bool:
    """Whether ``part`` provably divides ``whole`` (coefficient divides, symbols a sub-multiset)."""
    if part[0] == 0 or whole[0] % part[0]:
        return False
    rest = list(whole[1])
    for s in part[1]:
        if s not in rest:
            return False
        rest.remove(s)
    return True


def quotient(whole: Size, part: Size) -> Size:
    """``whole / part`` for a part that divides it."""
    rest = list(whole[1])
    for s in part[1]:
        rest.remove(s)
    return whole[0] // part[0], tuple(rest)


def dim_terms(ctx: PassContext, name: str, placeholder: str | None = None) -> list[Term] | None:
    """The inferred dims of ``name`` as terms; unknown dims become ``placeholder:i`` symbols (or make it None)."""
    type_proto = ctx.types.get(name)
    dims = dims_of(type_proto)
    if dims is None:
        return None
    terms: list[Term] = []
    for i, d in enumerate(type_proto.tensor_type.shape.dim):  # type: ignore[union-attr]
        if dims[i] is not None:
            terms.append(int(dims[i]))  # type: ignore[arg-type]
        elif d.HasField("dim_param") and d.dim_param:
            terms.append((1, (d.dim_param,)))
        elif placeholder is not None:
            terms.append((1, (f"?{placeholder}:{i}",)))
        else:
            return None
    return terms


# ----------------------------------------------------------------------------- layouts

Atom = tuple[str, Size]  # role ("B", "S", "T", "D", "D.0", ...) and size
Layout = list[list[Atom]]


def axis_term(axis: list[Atom]) -> Term:
    """The size of one layout axis."""
    return term(product([a[1] for a in axis]))


def roles(layout: Layout) -> list[list[str]]:
    """The roles of a layout, axis by axis, without size-1 atoms."""
    return [[a[0] for a in axis if a[1] != (1, ())] for axis in layout]


def fits(layout: Layout, want: list[list[str]], unit: set[str]) -> bool:
    """Whether the layout is exactly ``want`` (roles in ``unit`` have size 1 and may have been dropped)."""
    return roles(layout) == [[r for r in axis if r not in unit] for axis in want]


def take(atoms: list[Atom], want: Size, reverse: bool = False) -> list[Atom]:
    """Pop from the front of ``atoms`` the atoms whose sizes multiply to ``want`` (splitting a static atom).

    With ``reverse`` the list runs from the last atom backwards: a split then takes the minor part.
    """
    major, minor = (".1", ".0") if reverse else (".0", ".1")
    got: list[Atom] = []
    have: Size = (1, ())
    while have != want:
        while atoms and atoms[0][1] == (1, ()):
            atoms.pop(0)
        require(bool(atoms), "a Reshape target needs more elements than its input provides")
        role, size = atoms[0]
        need = quotient(want, have) if divides(have, want) else None
        require(need is not None, "a Reshape target does not align with the input's axes")
        if divides(size, need):  # type: ignore[arg-type]
            atoms.pop(0)
            got.append((role, size))
            have = product([have, size])
            continue
        require(not size[1] and not need[1] and size[0] % need[0] == 0, "a Reshape splits a symbolic dim")  # type: ignore[index]
        atoms[0] = (f"{role}{minor}", (size[0] // need[0], ()))  # type: ignore[index]
        got.append((f"{role}{major}", need))  # type: ignore[arg-type]
        have = want
    return got


def reshape_layout(layout: Layout, target: list[Term], allowzero: bool) -> Layout:
    """The layout after Reshape(target); NoMatch when the data movement cannot be proven."""
    target = list(target)
    for i, t in enumerate(target):
        if t == 0:
            require(not allowzero and i < len(layout), "a Reshape target has a 0 it cannot copy")
            target[i] = axis_term(layout[i])
    require(target.count(-1) <= 1, "a Reshape target has several -1")
    require(all(t == -1 or not isinstance(t, int) or t > 0 for t in target), "a Reshape target has a negative dim")
    atoms = [a for axis in layout for a in axis]
    cut = target.index(-1) if -1 in target else len(target)
    left = [take(atoms, sized(t)) for t in target[:cut]]
    if cut == len(target):
        require(all(a[1] == (1, ()) for a in atoms), "a Reshape target has fewer elements than its input")
        return left
    rev = [(r, s) for r, s in reversed(atoms)]
    right = [list(reversed(take(rev, sized(t), reverse=True))) for t in reversed(target[cut + 1 :])]
    middle = list(reversed(rev))
    return [*left, middle, *reversed(right)]


# ----------------------------------------------------------------------------- shape tensors


@dataclass
class Proof:
    """What a match has established: layouts of the pattern's tensors and the shape nodes it read."""

    ctx: PassContext
    view: GraphView
    layouts: dict[str, Layout] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # tensor -> "q" / "k" / "v": whose source dims its B, S, T atoms are

    def dims(self, name: str) -> list[Term] | None:
        """The dims of ``name``: from its proven layout when it has one, else from inference."""
        if name in self.layouts:
            return [axis_term(axis) for axis in self.layouts[name]]
        return dim_terms(self.ctx, name)

    def value(self, name: str, depth: int = 0) -> tuple[list[Term], bool]:
        """The elements of an int shape tensor and whether it is a scalar; NoMatch when unknown."""
        require(depth < MAX_CONE, "a shape computation is too deep")
        array = const_name(self.view, name)
        if array is not None:
            require(array.dtype.kind in "iu" and array.ndim <= 1, f"'{name}' is not an int vector")
            return [int(v) for v in array.reshape(-1)], array.ndim == 0
        node = self.view.producer.get(name)
        require(node is not None and is_standard(node) and node.op_type in SHAPE_OPS, f"the shape '{name}' is not computed from shapes")
        op = node.op_type  # type: ignore[union-attr]
        if op == "Shape":
            dims = self.dims(node.input[0])  # type: ignore[union-attr]
            require(dims is not None, f"the rank of '{node.input[0]}' is unknown")  # type: ignore[union-attr]
            n = len(dims)  # type: ignore[arg-type]
            start, end = int(get_attr(node, "start", 0)), get_attr(node, "end", None)  # type: ignore[arg-type]
            return list(dims[slice(max(-n, min(start, n)), None if end is None else max(-n, min(int(end), n)))]), False  # type: ignore[index, arg-type]
        if op in ("Identity", "Cast"):
            require(op == "Identity" or int(get_attr(node, "to", 0)) in (TensorProto.INT64, TensorProto.INT32), "a Cast leaves ints")  # type: ignore[arg-type]
            return self.value(node.input[0], depth + 1)  # type: ignore[union-attr]
        if op == "Concat":
            out: list[Term] = []
            for i in node.input:  # type: ignore[union-attr]
                vals, scalar_ = self.value(i, depth + 1)
                require(not scalar_, "Concat of a scalar")
                out.extend(vals)
            return out, False
        data, is_scalar = self.value(node.input[0], depth + 1)  # type: ignore[union-attr]
        require(not is_scalar or op == "Unsqueeze", f"{op} of a scalar shape value")
        if op == "Gather":
            require(int(get_attr(node, "axis", 0)) == 0, "Gather on another axis")  # type: ignore[arg-type]
            idx = const_name(self.view, node.input[1])  # type: ignore[union-attr]
            require(idx is not None and idx.ndim <= 1, "the Gather index is not a constant")
            picked = [int(i) for i in idx.reshape(-1)]  # type: ignore[union-attr]
            require(all(-len(data) <= i < len(data) for i in picked), "a Gather index is out of range")
            return [data[i] for i in picked], idx.ndim == 0  # type: ignore[union-attr]
        if op == "Slice":
            opset = opset_version(self.ctx.model) or 1
            require(opset >= 10, "Slice with attributes")
            parts = [const_name(self.view, i) if i else None for i in list(node.input[1:]) + [""] * 4][:4]  # type: ignore[union-attr]
            require(parts[0] is not None and parts[1] is not None, "the Slice bounds are not constants")
            require(parts[2] is None or [int(a) for a in parts[2].reshape(-1)] in ([0], [-1]), "Slice on another axis")
            require(parts[3] is None or [int(a) for a in parts[3].reshape(-1)] == [1], "Slice with a step")
            lo, hi = int(parts[0].reshape(-1)[0]), int(parts[1].reshape(-1)[0])  # type: ignore[union-attr]
            n = len(data)
            lo, hi = max(-n, min(lo, n)), max(-n, min(hi, n))
            return data[slice(lo, hi)], False
        if op == "Unsqueeze":
            axes = get_attr(node, "axes") if len(node.input) < 2 else const_name(self.view, node.input[1])  # type: ignore[union-attr]
            require(axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] in ([0], [-1]), "Unsqueeze to more than 1-D")
            require(is_scalar, "Unsqueeze of a vector")
            return data, False
        if op == "Squeeze":
            require(len(data) == 1, "Squeeze of a longer vector")
            return data, True
        raise NoMatch(f"{op} is not evaluated")
