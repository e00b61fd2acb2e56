"""The sharding-rule table of the DTensor operators (pure: no communication, no arrays).

Rules are written in DTensor's single-dim style: for one mesh dim, an operator class lists its
*strategies*, each ``(input placements, output placement)`` with one input placement per operand
(``None`` for an operand that is no DTensor: a scalar). For every mesh dim independently the
strategy with the fewest bytes moved (:func:`move_cost`, summed over the operands) is chosen; ties
go to the earlier strategy, so the order of a list is its preference. The inputs are then
redistributed to the chosen placements and the operator runs on the local shards.

The strategy lists (``R`` Replicate, ``S(d)`` Shard(d), ``P`` Partial("sum")):

* elementwise, operands broadcast to the output by NumPy's rules: ``R.. -> R``; for every output
  dim ``d`` that an operand is already sharded on: each operand ``S(its dim of d)``, or ``R`` where
  it broadcasts along ``d`` -> ``S(d)`` (so a lone Partial is reduced to Replicate, as in DTensor);
  linear ops only (``+ -`` of DTensors, unary ``-``, ``*`` by a replicated operand, ``/`` by a
  replicated divisor): ``P -> P``.
* reductions over ``axes``: ``R -> R``; ``S(d) -> P(op)`` for ``d`` in ``axes``, else ``S(d')``
  (``d'`` the dim's index in the result); ``P(sum) -> P(sum)`` for ``sum``/``mean``, ``P(op) ->
  P(op)`` for ``max``/``min``.
* matmul ``A(..., m, k) @ B(..., k, n)``: ``R,R -> R``; ``S(m),R -> S(m)``; ``R,S(n) -> S(n)``;
  ``S(k),S(k) -> P``; ``P,R -> P``; ``R,P -> P``; a batch dim sharded on both (``R`` where one
  broadcasts) -> that batch dim sharded.

A ragged input shard ``Shard(d, sizes=...)`` is kept: strategies sharding ``d`` use its sizes.
"""

from __future__ import annotations

from ..placement import Partial, Replicate, Shard

__all__ = ["move_cost", "choose", "elementwise", "reduction", "matmul", "LINEAR", "REDUCE_PARTIAL"]

R = Replicate()
P = Partial("sum")
INF = float("inf")

#: elementwise ops under which Partial("sum") stays Partial, and which operands may be Partial:
#: "all" every DTensor operand (and no scalar), "first" only the first (the others replicated), "any" one
LINEAR = {"add": "all", "subtract": "all", "negative": "all", "positive": "all", "multiply": "any",
          "divide": "first"}

#: the Partial reduce op that a reduction of a sharded dim gives
REDUCE_PARTIAL = {"sum": "sum", "mean": "sum", "max": "max", "min": "min", "prod": "product", "any": "max",
                  "all": "min"}


def move_cost(src, dst, n: int, nbytes: float) -> float:
    """Bytes a rank sends to turn placement ``src`` into ``dst`` on a mesh dim of ``n`` ranks,
    holding a local shard of ``nbytes``: all-gather ``(n-1)*b``; reduce-scatter / all-to-all
    ``b*(n-1)/n``; all-reduce ``2*b*(n-1)/n``; Replicate -> Shard a local slice (0). Nothing can be
    redistributed *to* a Partial (infinite)."""
    if src is None or src == dst:
        return 0.0
    if dst.is_partial():
        return INF
    if n == 1:  # nothing moves, but the shard is copied: keep placements where nothing else differs
        return 0.0 if src.is_replicate() else nbytes * 1e-6
    if src.is_partial():
        return nbytes * (n - 1) / n * (2 if dst.is_replicate() else 1)
    if src.is_replicate():
        return 0.0
    if dst.is_replicate():
        return nbytes * (n - 1)
    return nbytes * (n - 1) / n


def choose(strategies, actual, n: int, nbytes) -> tuple:
    """The strategy ``(inputs, output)`` with the fewest bytes moved (the first on ties)."""
    best, best_cost = None, INF
    for s in strategies:
        cost = 0.0
        for src, dst, b in zip(actual, s[0], nbytes):
            cost += move_cost(src, dst, n, b)
            if cost >= best_cost:
                break
        if cost < best_cost:
            best, best_cost = s, cost
    return best


def _sizes_of(actual, dims):
    """The ragged sizes of an operand already sharded on its dim ``dims[k]`` (or None)."""
    for p, d in zip(actual, dims):
        if d is not None and type(p) is Shard and p.dim == d and p.sizes is not None:
            return p.sizes
    return None


def _shard(d, sizes):
    return Shard(d) if sizes is None else Shard(d, sizes)


def elementwise(op: str, shapes, out_shape, actual) -> list:
    """Strategies of an elementwise op on one mesh dim. ``shapes[k]``: operand ``k``'s global shape
    (``None``: a scalar); ``actual[k]``: its placement on this mesh dim (``None``: not a DTensor)."""
    nd = len(out_shape)
    strategies = [(tuple(None if s is None else R for s in shapes), R)]
    for d in range(nd):
        dims = []
        for s in shapes:
            if s is None:
                dims.append(None)
                continue
            kd = d - (nd - len(s))
            dims.append(kd if kd >= 0 and s[kd] == out_shape[d] else None)
        sizes = _sizes_of(actual, dims)
        req = tuple(None if s is None else (R if kd is None else _shard(kd, sizes)) for s, kd in zip(shapes, dims))
        if any(type(r) is Shard and a == r for r, a in zip(req, actual)):  # an operand is sharded so already
            strategies.append((req, _shard(d, sizes)))
    kind = LINEAR.get(op)
    arrays = [k for k, s in enumerate(shapes) if s is not None]
    if kind == "all" and all(shapes[k] is not None and actual[k] is not None for k in range(len(shapes))):
        strategies.append((tuple(P for _ in shapes), P))
    elif kind == "any":
        for k in arrays:
            strategies.append((tuple(None if s is None else (P if j == k else R) for j, s in enumerate(shapes)), P))
    elif kind == "first" and 0 in arrays:
        strategies.append((tuple(None if s is None else (P if j == 0 else R) for j, s in enumerate(shapes)), P))
    return strategies


def reduction(op: str, ndim: int, axes, keepdims: bool, actual) -> list:
    """Strategies of a reduction of an ``ndim``-d array over ``axes`` on one mesh dim."""
    sizes = actual.sizes if type(actual) is Shard else None
    strategies = [((R,), R)]
    for d in range(ndim):
        sz = sizes if type(actual) is Shard and actual.dim == d else None
        if d in axes:
            strategies.append(((_shard(d, sz),), Partial(REDUCE_PARTIAL[op])))
        else:
            nd = d if keepdims else d - sum(1 for a in axes if a < d)
            strategies.append(((_shard(d, sz),), _shard(nd, sz)))
    if op in ("sum", "mean"):
        strategies.append(((P,), P))
    elif op in ("max", "min"):
        strategies.append(((Partial(op),), Partial(op)))
    return strategies


def matmul_dims(na: int, nb: int):
    """(m dim of A or None, k dim of A, k dim of B, n dim of B or None, batch ndim of the output)."""
    m = na - 2 if na >= 2 else None
    n = nb - 1 if nb >= 2 else None
    return m, na - 1, (nb - 2 if nb >= 2 else 0), n, max(na - 2, nb - 2, 0)


def matmul(sa, sb, actual) -> list:
    """Strategies of ``A @ B`` (global shapes ``sa``, ``sb``) on one mesh dim."""
    na, nb = len(sa), len(sb)
    m, ka, kb, n, ob = matmul_dims(na, nb)
    out_m = ob if m is not None else None
    out_n = ob + (1 if m is not None else 0) if n is not None else None
    strategies = [((R, R), R)]
    if m is not None:
        sz = _sizes_of(actual[:1], (m,))
        strategies.append(((_shard(m, sz), R), _shard(out_m, sz)))
    if n is not None:
        sz = _sizes_of(actual[1:], (n,))
        strategies.append(((R, _shard(n, sz)), _shard(out_n, sz)))
    sz = _sizes_of(actual, (ka, kb))
    strategies.append(((_shard(ka, sz), _shard(kb, sz)), P))
    strategies.append(((P, R), P))
    strategies.append(((R, P), P))
    for d in range(ob):  # batch dims, broadcast by NumPy's rules
        da, db = d - (ob - (na - 2)), d - (ob - (nb - 2))
        size = max(sa[da] if 0 <= da else 1, sb[db] if 0 <= db else 1)
        ra = _shard(da, None) if 0 <= da and na >= 2 and sa[da] == size else R
        rb = _shard(db, None) if 0 <= db and nb >= 2 and sb[db] == size else R
        strategies.append(((ra, rb), _shard(d, None)))
    return strategies
