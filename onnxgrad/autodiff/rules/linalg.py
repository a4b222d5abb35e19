"""Derivative rules for matrix products: MatMul, Gemm, Einsum.

Products whose batch dimensions broadcast sum their gradients back to each operand's
shape with `b.sum_to`, which also works when those dimensions are only known at run time.
"""

from __future__ import annotations

from onnxgrad.autodiff.rules import rule
from onnxgrad.errors import UnsupportedOpError


def _swap_last(b, x: str, rank: int) -> str:
    """xᵀ over the last two axes."""
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.Transpose(x, perm=perm)


@rule("MatMul")
def matmul(b, node, dys):
    """y = A · B (batched, numpy rules)  →  dA = sum_to(dy · Bᵀ, A),  dB = sum_to(Aᵀ · dy, B)

    A 1-D A is a row (1, K) and a 1-D B a column (K, 1) while the products are formed, and
    the promoted axis is removed again from dy and from the gradient.
    """
    a, c = node.input
    y, dy = node.output[0], dys[0]
    ra, rc = b.rank(a), b.rank(c)
    if ra is None or rc is None:
        raise UnsupportedOpError(
            "MatMul",
            node.name,
            node.opset,
            detail=f"the ranks of '{a}' and '{c}' must be known; run shape inference or give "
            "the graph inputs a shape",
        )
    need_a, need_c = node.needs_grad(0), node.needs_grad(1)

    # 1. Vector · vector is a dot product; matrix · matrix needs no transpose nodes.
    if ra == 1 and rc == 1:
        return [b.Mul(dy, c) if need_a else None, b.Mul(dy, a) if need_c else None]
    if ra == 2 and rc == 2:
        return [
            b.Gemm(dy, c, transB=1) if need_a else None,  # dA = dy · Bᵀ
            b.Gemm(a, dy, transA=1) if need_c else None,  # dB = Aᵀ · dy
        ]

    # 2. Promote 1-D operands, and dy with them, to matrices.
    if ra == 1:
        dy = b.unsqueeze(dy, [-2])  # (…, N) → (…, 1, N)
    if rc == 1:
        dy = b.unsqueeze(dy, [-1])  # (…, M) → (…, M, 1)
    rank = max(ra, rc, 2)  # of the promoted product
    batch = None
    y_shape = b.shape(y)
    if y_shape is not None:
        batch = y_shape[: len(y_shape) - (ra > 1) - (rc > 1)]

    # 3. dA = dy · Bᵀ, then summed over the batch axes that A was broadcast along.
    da = dc = None
    if need_a:
        c_t = b.unsqueeze(c, [0]) if rc == 1 else _swap_last(b, c, rc)
        da = b.MatMul(dy, c_t)
        if ra == 1:  # (…, 1, K) → (K)
            da = b.reduce_sum(da, list(range(rank - 1)), keepdims=0)
        else:
            a_shape = b.shape(a)
            shape = None if batch is None or a_shape is None else batch + a_shape[-2:]
            da = b.sum_to(da, a, shape)

    # 4. dB = Aᵀ · dy, likewise.
    if need_c:
        a_t = b.unsqueeze(a, [1]) if ra == 1 else _swap_last(b, a, ra)
        dc = b.MatMul(a_t, dy)
        if rc == 1:  # (…, K, 1) → (K)
            dc = b.reduce_sum(dc, list(range(rank - 2)) + [rank - 1], keepdims=0)
        else:
            c_shape = b.shape(c)
            shape = None if batch is None or c_shape is None else batch + c_shape[-2:]
            dc = b.sum_to(dc, c, shape)
    return [da, dc]


@rule("Gemm")
def gemm(b, node, dys):
    """y = α · A' · B' + β · C, A' = Aᵀ if transA, B' = Bᵀ if transB  →
    dA' = α · dy · B'ᵀ,  dB' = α · A'ᵀ · dy,  dC = sum_to(β · dy, C)

    Each product is itself one Gemm whose trans flags absorb every transpose.
    """
    a, c = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    y, dy = node.output[0], dys[0]
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    ta = int(node.attrs.get("transA", 0))
    tc = int(node.attrs.get("transB", 0))

    def product(p: str, q: str, trans_p: int, trans_q: int) -> str:
        # Before opset 11, C is a required input of Gemm: a 0 scaled by β = 0 stands in.
        zero = b.const(0.0, like=p) if b.opset < 11 else None
        return b.Gemm(
            p,
            q,
            zero,
            alpha=alpha if alpha != 1.0 else None,
            beta=0.0 if zero else None,
            transA=trans_p or None,
            transB=trans_q or None,
        )

    da = dc = dbias = None
    if node.needs_grad(0):
        # transA = 0: dA = α · dy · B'ᵀ;  transA = 1: dA = (α · dy · B'ᵀ)ᵀ = α · B' · dyᵀ
        da = product(c, dy, tc, 1) if ta else product(dy, c, 0, 1 - tc)
    if node.needs_grad(1):
        # transB = 0: dB = α · A'ᵀ · dy;  transB = 1: dB = (α · A'ᵀ · dy)ᵀ = α · dyᵀ · A'
        dc = product(dy, a, 1, ta) if tc else product(a, dy, 1 - ta, 0)
    if bias is not None and node.needs_grad(2) and beta != 0.0:
        # β = 0 leaves C out of y altogether: its gradient is a true zero, left out here.
        scaled = dy if beta == 1.0 else b.Mul(dy, b.const(beta, like=dy))
        dbias = b.sum_to(scaled, bias, b.shape(y))
    return [da, dc, dbias]


def _einsum_terms(node) -> tuple[list[str], str]:
    """The input subscripts and the output subscript of an Einsum equation.

    Without "->" the output is every letter used exactly once, in alphabetical order,
    after "..." when any input has one.
    """
    equation = node.attrs["equation"].replace(" ", "")
    if "->" in equation:
        lhs, out = equation.split("->")
    else:
        lhs = equation
        letters = lhs.replace("...", "").replace(",", "")
        out = "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
        if "..." in lhs:
            out = "..." + out
    return lhs.split(","), out


def _einsum_unsupported(node, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        "Einsum",
        node.name,
        node.opset,
        detail=f"equation '{node.attrs['equation']}': {why}; rewrite it with MatMul/Transpose "
        "or freeze the parameters behind it",
    )


def _ellipsis_dims(b, node, terms: list[str]) -> list[int | str | None] | None:
    """The broadcast shape of the "..." dimensions of all operands, as far as it is known.

    Worked out here rather than read from the output: onnx's Einsum shape inference takes
    the first operand's symbolic dimensions even where another operand's could broadcast.
    """
    dims: list[list[int | str | None]] = []
    for x, term in zip(node.input, terms):
        if "..." not in term:
            continue
        shape = b.shape(x)
        if shape is None:
            return None
        dims.append(list(shape[: len(shape) - len(term) + 3]))
    rank = max((len(d) for d in dims), default=0)
    out: list[int | str | None] = []
    for k in range(rank):
        column = [d[len(d) - rank + k] for d in dims if len(d) - rank + k >= 0]
        sizes = {c for c in column if c != 1}
        if not sizes:
            out.append(1)
        elif len(sizes) == 1 and None not in sizes:
            out.append(sizes.pop())
        else:
            out.append(None)  # symbolic dimensions that may or may not broadcast
    return out


@rule("Einsum")
def einsum(b, node, dys):
    """y = einsum(s₁,…,sₙ → o; X₁,…,Xₙ)  →  dXᵢ = einsum(o, s_{j≠i} → sᵢ; dy, X_{j≠i})

    Letters of sᵢ found nowhere else were summed inside Xᵢ alone: the gradient is constant
    along them (an Expand). Broadcast "..." dimensions are summed back with sum_to.
    Supported: no letter repeated within the differentiated operand (no diagonals), "..."
    only at the start of a term, and kept in the output when an input has it.
    """
    terms, out = _einsum_terms(node)
    dy = dys[0]
    for t in terms + [out]:
        if "..." in t and not t.startswith("..."):
            raise _einsum_unsupported(node, "'...' must start each term it appears in")
    if any("..." in t for t in terms) and "..." not in out:
        raise _einsum_unsupported(node, "'...' summed out of the output")
    out_letters = out.replace("...", "")
    batch = _ellipsis_dims(b, node, terms)

    grads: list[str | None] = []
    for i, (x, term) in enumerate(zip(node.input, terms)):
        if not node.needs_grad(i):
            grads.append(None)
            continue
        letters = term.replace("...", "")
        if len(set(letters)) != len(letters):
            raise _einsum_unsupported(node, f"a letter repeats within '{term}' (a diagonal)")
        others = [t for j, t in enumerate(terms) if j != i]
        kept = "".join(ch for ch in letters if ch in out_letters or any(ch in t for t in others))
        prefix = "..." if term.startswith("...") else ""

        # 1. Contract dy with every other operand into the letters of Xᵢ that survive.
        equation = ",".join([out] + others) + "->" + prefix + kept
        operands = [dy] + [n for j, n in enumerate(node.input) if j != i]
        dx = b.Einsum(*operands, equation=equation)

        # 2. Letters summed within Xᵢ alone: the gradient is constant along them.
        if len(kept) < len(letters):
            axes = [p - len(letters) for p, ch in enumerate(letters) if ch not in kept]
            dx = b.Expand(b.unsqueeze(dx, axes), b.Shape(x))

        # 3. Broadcast "..." dimensions back to Xᵢ's.
        if prefix:
            x_shape = b.shape(x)
            shape = None
            if batch is not None and x_shape is not None:
                shape = batch + x_shape[len(x_shape) - len(letters) :]
            dx = b.sum_to(dx, x, shape)
        grads.append(dx)
    return grads
