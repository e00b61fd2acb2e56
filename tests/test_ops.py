"""Operators on DTensors (mpilocal.ops): the rule oracle (every rule, every placement combination
on 1-D and 2-D meshes, even and uneven shapes, against NumPy on the full arrays), chosen
placements and communication, errors, gradients against finite differences."""

import itertools

import numpy as np
import pytest
from conftest import W, DEVICE, assert_all, make_mesh, to_device, to_host

import mpilocal
from mpilocal import CommDebugMode, DTensor, Partial, Replicate, Shard, distribute_tensor
from mpilocal.autograd import no_grad
from mpilocal.ops import record_plans

R, S0, S1, P = Replicate(), Shard(0), Shard(1), Partial("sum")
KINDS = ["1d", "1xN", "Nx1", "2x2"]


def mesh_of(kind):
    m = make_mesh(kind)
    if m is None:
        pytest.skip(f"mesh {kind} does not fit {W} ranks")
    return m


def ints(shape, seed, lo=-4, hi=5, nonzero=False):
    rng = np.random.default_rng(seed)
    a = rng.integers(lo, hi, size=shape).astype(np.float64)
    if nonzero:
        a[a == 0] = 1.0
    return a


def make(g, mesh, pl):
    """A DTensor of global value ``g`` with placements ``pl``: Shard/Replicate dims as distribute_tensor
    gives them; on Partial mesh dims every rank holds a different term (the terms sum to ``g``)."""
    pl = tuple(pl)
    base = distribute_tensor(to_device(g), mesh, [R if p.is_partial() else p for p in pl])
    local = to_host(base.to_local()).copy()
    coord = mesh.get_coordinate()
    pdims = [i for i, p in enumerate(pl) if p.is_partial()]
    if pdims and coord is not None:
        first = all(coord[i] == 0 for i in pdims)
        part = local * (1.0 if first else 0.0)
        for i in pdims:
            if all(coord[j] == 0 for j in pdims if j != i):
                part = part + 3.0 * (coord[i] - (mesh.shape[i] - 1) / 2)
        local = part
    return DTensor.from_local(to_device(np.ascontiguousarray(local)), mesh, pl, shape=g.shape)


def options(ndim, partial=True):
    opts = [R] + [Shard(d) for d in range(ndim)] + ([P] if partial else [])
    return opts


def combos(mesh, ndim, partial=True):
    return list(itertools.product(options(ndim, partial), repeat=mesh.ndim))


def full(x):
    return to_host(x.full_tensor())


class Problems(list):
    def check(self, what, got, want):
        want = np.asarray(want)
        if got.shape != want.shape or got.dtype != want.dtype or not np.allclose(got, want, equal_nan=True):
            self.append(f"{what}: got {got.shape} {got.dtype} {got.ravel()[:6]}, want {want.shape} {want.dtype} "
                        f"{want.ravel()[:6]}")

    def done(self):
        assert_all(not self, "; ".join(self[:5]) + (f" (+{len(self) - 5})" if len(self) > 5 else ""))


SHAPES = [(4, 6), (5, 3)]  # even at 1, 2 ranks (4 at 4 ranks); uneven (and empty shards at 4 ranks)


# ------------------------------------------------------------------------------------------------
# rule oracle: elementwise
# ------------------------------------------------------------------------------------------------
BINARY = [("add", np.add), ("subtract", np.subtract), ("multiply", np.multiply), ("divide", np.divide),
          ("maximum", np.maximum), ("less", np.less)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_oracle_elementwise_binary(kind, shape):
    mesh = mesh_of(kind)
    probs = Problems()
    a = ints(shape, 1)
    for bshape in (shape, shape[1:], (shape[0], 1)):
        b = ints(bshape, 2, nonzero=True)
        for pa in combos(mesh, 2):
            for pb in combos(mesh, len(bshape)):
                A, B = make(a, mesh, pa), make(b, mesh, pb)
                for name, f in BINARY:
                    try:
                        probs.check(f"{name} {pa} {pb} {bshape}", full(f(A, B)), f(a, b))
                    except Exception as e:  # noqa: BLE001
                        probs.append(f"{name} {pa} {pb} {bshape}: {type(e).__name__}: {e}")
    probs.done()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_oracle_elementwise_scalars_unary_plain(kind, shape):
    mesh = mesh_of(kind)
    probs = Problems()
    a = ints(shape, 3)
    plain = ints(shape[1:], 4, nonzero=True)
    cases = [("A+2", lambda A: A + 2, lambda a: a + 2), ("2-A", lambda A: 2 - A, lambda a: 2 - a),
             ("A*3", lambda A: A * 3, lambda a: a * 3), ("A/2", lambda A: A / 2, lambda a: a / 2),
             ("-A", lambda A: -A, lambda a: -a), ("abs", abs, np.abs), ("exp", np.exp, np.exp),
             ("relu", lambda A: A.relu(), lambda a: np.maximum(a, 0)),
             ("A**2", lambda A: A ** 2, lambda a: a ** 2), ("A>0", lambda A: A > 0, lambda a: a > 0),
             ("A+plain", lambda A: A + to_device(plain), lambda a: a + plain),
             ("plain*A", lambda A: np.multiply(to_device(plain), A), lambda a: plain * a),
             ("where", lambda A: np.where(A > 0, A, 0.5 * A), lambda a: np.where(a > 0, a, 0.5 * a)),
             ("astype32", lambda A: A.astype(np.float32), lambda a: a.astype(np.float32)),
             ("astype_i", lambda A: A.astype(np.int64), lambda a: a.astype(np.int64))]
    for pa in combos(mesh, 2):
        A = make(a, mesh, pa)
        for name, f, ref in cases:
            try:
                probs.check(f"{name} {pa}", full(f(A)), ref(a))
            except Exception as e:  # noqa: BLE001
                probs.append(f"{name} {pa}: {type(e).__name__}: {e}")
    probs.done()


# ------------------------------------------------------------------------------------------------
# rule oracle: reductions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_oracle_reductions(kind, shape):
    mesh = mesh_of(kind)
    probs = Problems()
    a = ints(shape, 5, lo=1, hi=4)
    b = a > 2
    for pa in combos(mesh, 2):
        A = make(a, mesh, pa)
        Bb = make(b, mesh, tuple(R if p.is_partial() else p for p in pa))
        for op in ("sum", "mean", "max", "min", "prod"):
            for axis in (None, 0, 1, (0, 1), -1):
                for keep in (False, True):
                    try:
                        probs.check(f"{op} {axis} {keep} {pa}", full(getattr(A, op)(axis=axis, keepdims=keep)),
                                    getattr(np, op)(a, axis=axis, keepdims=keep))
                    except Exception as e:  # noqa: BLE001
                        probs.append(f"{op} {axis} {pa}: {type(e).__name__}: {e}")
        for op in ("any", "all"):
            for axis in (None, 0, 1):
                try:
                    probs.check(f"{op} {axis} {pa}", full(getattr(Bb, op)(axis=axis)), getattr(np, op)(b, axis=axis))
                except Exception as e:  # noqa: BLE001
                    probs.append(f"{op} {axis} {pa}: {type(e).__name__}: {e}")
        try:
            probs.check(f"np.sum {pa}", full(np.sum(A, axis=0)), np.sum(a, axis=0))
            probs.check(f"np.mean {pa}", full(np.mean(A)), np.mean(a))
        except Exception as e:  # noqa: BLE001
            probs.append(f"np.sum {pa}: {type(e).__name__}: {e}")
    probs.done()


# ------------------------------------------------------------------------------------------------
# rule oracle: matmul, shape ops, indexing, concatenation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_oracle_matmul(kind, shape):
    mesh = mesh_of(kind)
    probs = Problems()
    m, k = shape
    a, b, v = ints((m, k), 6), ints((k, 5), 7), ints((k,), 8)
    a3 = ints((3, m, k), 9)
    for pa in combos(mesh, 2):
        A = make(a, mesh, pa)
        for pb in combos(mesh, 2):
            B = make(b, mesh, pb)
            try:
                probs.check(f"{pa}@{pb}", full(A @ B), a @ b)
            except Exception as e:  # noqa: BLE001
                probs.append(f"{pa}@{pb}: {type(e).__name__}: {e}")
        for pv in combos(mesh, 1):
            try:
                probs.check(f"{pa}@v{pv}", full(np.matmul(A, make(v, mesh, pv))), a @ v)
            except Exception as e:  # noqa: BLE001
                probs.append(f"{pa}@v{pv}: {type(e).__name__}: {e}")
    for p3 in combos(mesh, 3, partial=False):
        try:
            probs.check(f"batched {p3}", full(make(a3, mesh, p3) @ make(b, mesh, (R,) * mesh.ndim)), a3 @ b)
        except Exception as e:  # noqa: BLE001
            probs.append(f"batched {p3}: {type(e).__name__}: {e}")
    probs.done()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_oracle_shape_ops_and_indexing(kind, shape):
    mesh = mesh_of(kind)
    probs = Problems()
    a = ints(shape, 10)
    c = ints(shape, 11)
    n0, n1 = shape
    cases = [("T", lambda A: A.T, lambda a: a.T), ("transpose", lambda A: np.transpose(A), lambda a: a.T),
             ("reshape-flat", lambda A: A.reshape(-1), lambda a: a.reshape(-1)),
             ("reshape-3d", lambda A: A.reshape(n0, n1, 1), lambda a: a.reshape(n0, n1, 1)),
             ("reshape-swap", lambda A: A.reshape(n1, n0), lambda a: a.reshape(n1, n0)),
             ("[1:4]", lambda A: A[1:4], lambda a: a[1:4]), ("[::2]", lambda A: A[::2], lambda a: a[::2]),
             ("[2]", lambda A: A[2], lambda a: a[2]), ("[:,1]", lambda A: A[:, 1], lambda a: a[:, 1]),
             ("[-1,1:]", lambda A: A[-1, 1:], lambda a: a[-1, 1:]),
             ("[...,None]", lambda A: A[..., None], lambda a: a[..., None]),
             ("[::-1]", lambda A: A[::-1], lambda a: a[::-1]), ("[1::3,::2]", lambda A: A[1::3, ::2],
                                                               lambda a: a[1::3, ::2]),
             ("[1:4]+1", lambda A: A[1:4] + 1, lambda a: a[1:4] + 1),
             ("[1:4].sum(0)", lambda A: A[1:4].sum(axis=0), lambda a: a[1:4].sum(axis=0))]
    for pa in combos(mesh, 2):
        A = make(a, mesh, pa)
        for name, f, ref in cases:
            try:
                probs.check(f"{name} {pa}", full(f(A)), ref(a))
            except Exception as e:  # noqa: BLE001
                probs.append(f"{name} {pa}: {type(e).__name__}: {e}")
        for pc in combos(mesh, 2):
            C = make(c, mesh, pc)
            for ax in (0, 1):
                try:
                    probs.check(f"concat{ax} {pa} {pc}", full(np.concatenate([A, C], axis=ax)),
                                np.concatenate([a, c], axis=ax))
                    probs.check(f"stack{ax} {pa} {pc}", full(np.stack([A, C], axis=ax)), np.stack([a, c], axis=ax))
                except Exception as e:  # noqa: BLE001
                    probs.append(f"concat {pa} {pc}: {type(e).__name__}: {e}")
    probs.done()


# ------------------------------------------------------------------------------------------------
# chosen placements and communication (DTensor's rules)
# ------------------------------------------------------------------------------------------------
def test_chosen_placements_and_no_communication():
    mesh = mesh_of("1d")
    a, b = ints((8, 6), 1), ints((6, 4), 2)
    A0 = make(a, mesh, [S0])
    Ar = make(a, mesh, [R])
    B = make(b, mesh, [R])
    got = {}
    As1, Bs0, Bs1, Pa = make(a, mesh, [S1]), make(b, mesh, [S0]), make(b, mesh, [S1]), make(a, mesh, [P])
    with CommDebugMode() as cm:
        got["S0+R"] = (A0 + Ar).placements
        got["S0*2"] = (A0 * 2).placements
        got["S0@R"] = (A0 @ B).placements
        got["R@S1"] = (Ar @ Bs1).placements
        got["S1@S0"] = (As1 @ Bs0).placements
        got["sum0"] = A0.sum(axis=0).placements
        got["sum1"] = A0.sum(axis=1).placements
        got["T"] = A0.T.placements
        got["P+P"] = (Pa + Pa).placements
        got["P*R"] = (Pa * Ar).placements
        got["P*2"] = (Pa * 2).placements
        got["-P"] = (-Pa).placements
        got["P.sum"] = Pa.sum(axis=0).placements
    comm = cm.get_total_counts()
    with CommDebugMode() as cm2:
        got["P+1"] = (Pa + 1).placements  # not linear: reduced first
        got["exp(P)"] = np.exp(Pa).placements
    want = {"S0+R": (S0,), "S0*2": (S0,), "S0@R": (S0,), "R@S1": (S1,), "S1@S0": (P,), "sum0": (Partial("sum"),),
            "sum1": (S0,), "T": (S1,), "P+P": (P,), "P*R": (P,), "P*2": (P,), "-P": (P,), "P.sum": (P,),
            "P+1": (R,), "exp(P)": (R,)}
    if W == 1:
        want = {k: v for k, v in want.items()}
    assert_all(got == want and comm == 0 and (W == 1 or cm2.get_total_counts() == 2),
               f"{got} vs {want}; collectives {comm}, {cm2.get_total_counts()}")


def test_plans_are_listed_per_operator():
    mesh = mesh_of("1d")
    A = make(ints((8, 6), 1), mesh, [S0])
    B = make(ints((8, 6), 2), mesh, [S1])
    with CommDebugMode() as cm, record_plans() as plans:
        C = A + B
    ok = len(plans) == 1 and plans[0][0] == "add" and plans[0][2] == C.placements
    if W > 1:
        ok = ok and len(plans[0][1]) == 1 and cm.get_total_counts() == 1
    assert_all(ok, f"{plans} {cm.get_comm_counts()}")


def test_comm_debug_mode_lists_operator_plans():
    mesh = mesh_of("1d")
    A = make(ints((8, 6), 1), mesh, [S0])
    B = make(ints((8, 6), 2), mesh, [S1])
    with CommDebugMode() as cm:
        C = A * B
        D = C.sum(axis=0)
    plans = cm.get_operator_plans()
    ok = [p[0] for p in plans] == ["multiply", "DTensor.sum"] and plans[1][2] == D.placements
    ok = ok and (W == 1 or (plans[0][1] == ((1, (S1,), (S0,)),) and cm.get_comm_counts()["all_to_all_single"] == 1))
    assert_all(ok, f"{plans} {dict(cm.get_comm_counts())}")


def test_cheapest_redistribution_for_matmul():
    """S(0) @ S(0): gathering B (k x n, small) is cheaper than gathering A: A stays S(0)."""
    mesh = mesh_of("1d")
    A = make(ints((64, 8), 1), mesh, [S0])
    B = make(ints((8, 4), 2), mesh, [S0])
    with record_plans() as plans:
        C = A @ B
    moved = plans[0][1]
    ok = C.placements == (S0,) and (W == 1 or [m[0] for m in moved] == [1])
    assert_all(ok, f"{C.placements} {plans}")


# ------------------------------------------------------------------------------------------------
# errors and printing
# ------------------------------------------------------------------------------------------------
def test_errors_are_clear_on_every_rank():
    mesh = mesh_of("1d")
    A = make(ints((4, 6), 1), mesh, [S0])
    msgs = []
    for fn, exc, words in [
        (lambda: A[A > 0], IndexError, "boolean"),
        (lambda: np.cumsum(A), TypeError, "local_map"),
        (lambda: np.add.reduce(A), TypeError, "redistribute"),
        (lambda: A + make(ints((5, 6), 1), mesh, [S0]), ValueError, "broadcast"),
        (lambda: A @ A, ValueError, "contracted"),
    ]:
        try:
            fn()
            msgs.append("no exception")
        except exc as e:
            if words not in str(e):
                msgs.append(str(e))
    other = make_mesh("1xN")  # another mesh (shape (1, W)) over the same ranks
    try:
        A + make(ints((4, 6), 1), other, [R, S0])
        msgs.append("different meshes: no exception")
    except ValueError as e:
        if "different meshes" not in str(e):
            msgs.append(str(e))
    assert_all(not msgs, f"{msgs}")


def test_repr_does_not_communicate():
    mesh = mesh_of("1d")
    A = make(ints((5, 3), 1), mesh, [S0])
    with CommDebugMode() as cm:
        r = repr(A + 1)
    assert_all(cm.get_total_counts() == 0 and "shape=(5, 3)" in r and "Shard(dim=0)" in r, r)


def test_inplace_and_no_grad():
    mesh = mesh_of("1d")
    a = ints((5, 3), 1)
    A = make(a, mesh, [S0])
    A += 1
    A *= make(a, mesh, [R])
    probs = Problems()
    probs.check("inplace", full(A), (a + 1) * a)
    W_ = distribute_tensor(to_device(a.copy()), mesh, [S0], requires_grad=True)
    (W_ * W_).sum().backward()
    try:
        W_ -= 0.1 * W_.grad
        probs.append("in-place on a leaf that requires grad outside no_grad did not raise")
    except RuntimeError:
        pass
    with no_grad():
        W_ -= 0.1 * W_.grad
    probs.check("sgd step", to_host(W_.detach().full_tensor()), a - 0.1 * 2 * a)
    try:
        B = make(a, mesh, [S0])
        B += make(a, mesh, [P])  # the result is S0: fine
        C = make(a, mesh, [R])
        C += make(a, mesh, [S0])  # result S0, target R: clear error
        probs.append("placement-changing in-place did not raise")
    except RuntimeError as e:
        if "in place needs the same" not in str(e):
            probs.append(str(e))
    probs.done()


# ------------------------------------------------------------------------------------------------
# gradients against finite differences (on the full arrays, in NumPy)
# ------------------------------------------------------------------------------------------------
def numgrad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


GRAD_CASES = [
    ("x*y+x", lambda X, Y: (X * Y + X).sum(), lambda x, y: (x * y + x).sum()),
    ("x@y.T", lambda X, Y: ((X @ Y.T) ** 2).mean(), lambda x, y: ((x @ y.T) ** 2).mean()),
    ("exp/tanh", lambda X, Y: (np.exp(X * 0.1) + np.tanh(Y)).sum(axis=0).sum(),
     lambda x, y: (np.exp(x * 0.1) + np.tanh(y)).sum()),
    ("relu-mean", lambda X, Y: (X - Y).relu().mean(axis=1).sum(), lambda x, y: np.maximum(x - y, 0).mean(1).sum()),
    ("slice", lambda X, Y: (X[1:4] * Y[1:4]).sum() + X[2].sum(), lambda x, y: (x[1:4] * y[1:4]).sum() + x[2].sum()),
    ("reshape/T", lambda X, Y: (X.T.reshape(-1) * Y.T.reshape(-1)).sum(), lambda x, y: (x.T.ravel() * y.T.ravel()).sum()),
    ("div", lambda X, Y: (X / (Y * Y + 1)).sum(), lambda x, y: (x / (y * y + 1)).sum()),
    ("concat", lambda X, Y: (np.concatenate([X, Y], axis=1) ** 2).sum(), lambda x, y: (np.concatenate([x, y], 1) ** 2).sum()),
]


@pytest.mark.parametrize("kind", ["1d", "2x2"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_vs_finite_differences(kind, case):
    mesh = mesh_of(kind)
    name, f, ref = case
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    gx = numgrad(lambda t: ref(t, y), x)
    gy = numgrad(lambda t: ref(x, t), y)
    probs = Problems()
    for px in combos(mesh, 2, partial=False):
        for py in (px, (R,) * mesh.ndim):
            X = distribute_tensor(to_device(x), mesh, px, requires_grad=True)
            Y = distribute_tensor(to_device(y), mesh, py, requires_grad=True)
            try:
                out = f(X, Y)
                out.backward()
                for what, G, want in (("dx", X.grad, gx), ("dy", Y.grad, gy)):
                    got = to_host(G.full_tensor())
                    if not np.allclose(got, want, atol=1e-5):
                        probs.append(f"{name} {what} {px} {py}: {got.ravel()[:4]} vs {want.ravel()[:4]}")
                probs.check(f"{name} value {px}", np.asarray(to_host(out.detach().full_tensor())),
                            np.asarray(ref(x, y)))
            except Exception as e:  # noqa: BLE001
                probs.append(f"{name} {px} {py}: {type(e).__name__}: {e}")
    probs.done()


def _c(n):
    return np.arange(1.0, n + 1.0)


# (name, DTensor function, NumPy reference, input maker): max/min/prod/abs/sqrt (issue 12); inputs
# without ties for max/min (random normals), with zeros for prod and abs (the finite difference of a
# product is exact in each variable, and of |x| at 0 is 0: PyTorch's sign convention)
UNARY_GRAD_CASES = [
    ("max", lambda X: X.max() * 3.0, lambda x: x.max() * 3.0, None),
    ("max0", lambda X: (X.max(axis=0) * _c(X.shape[1])).sum(), lambda x: (x.max(axis=0) * _c(x.shape[1])).sum(),
     None),
    ("max1k", lambda X: (X.max(axis=1, keepdims=True) * _c(X.shape[0])[:, None]).sum(),
     lambda x: (x.max(axis=1, keepdims=True) * _c(x.shape[0])[:, None]).sum(), None),
    ("min", lambda X: X.min() * 2.0, lambda x: x.min() * 2.0, None),
    ("amin1", lambda X: (np.amin(X, axis=1) * _c(X.shape[0])).sum(), lambda x: (x.min(axis=1) * _c(x.shape[0])).sum(),
     None),
    ("min0k", lambda X: (X.min(dim=0, keepdim=True) ** 2).sum(), lambda x: (x.min(axis=0, keepdims=True) ** 2).sum(),
     None),
    ("max-of-min", lambda X: X.min(axis=0).max() + X.max(axis=1).min(), lambda x: x.min(axis=0).max() + x.max(1).min(),
     None),
    ("prod", lambda X: X.prod(), lambda x: x.prod(), "near1"),
    ("prod0", lambda X: (X.prod(axis=0) * _c(X.shape[1])).sum(), lambda x: (x.prod(axis=0) * _c(x.shape[1])).sum(),
     "near1"),
    ("prod1-zeros", lambda X: (X.prod(axis=1) * _c(X.shape[0])).sum(),
     lambda x: (x.prod(axis=1) * _c(x.shape[0])).sum(), "zeros"),
    ("prod-onezero", lambda X: X.prod() * 2.0, lambda x: x.prod() * 2.0, "onezero"),
    ("prod0-zeros", lambda X: (np.prod(X, axis=0) * _c(X.shape[1])).sum(),
     lambda x: (x.prod(axis=0) * _c(x.shape[1])).sum(), "zeros"),
    ("abs", lambda X: (abs(X) * _c(X.shape[1])).sum(), lambda x: (np.abs(x) * _c(x.shape[1])).sum(), "zeros"),
    ("np.abs", lambda X: (np.abs(X) ** 2 + X.abs()).sum(), lambda x: (np.abs(x) ** 2 + np.abs(x)).sum(), "zeros"),
    ("sqrt", lambda X: (np.sqrt(X * X + 0.5) * _c(X.shape[1])).sum(),
     lambda x: (np.sqrt(x * x + 0.5) * _c(x.shape[1])).sum(), None),
    ("sqrt-method", lambda X: (X * X + 1.0).sqrt().max(axis=0).sum(), lambda x: np.sqrt(x * x + 1.0).max(axis=0).sum(),
     None),
]


def _grad_input(shape, kind, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if kind == "near1":  # products of O(1)
        x = np.sign(x) * (0.8 + 0.4 * rng.random(shape))
    elif kind == "zeros":  # one zero in the first reduced group, two in another, one in the whole array's
        x = np.sign(x) * (0.8 + 0.4 * rng.random(shape))
        x[1, 1] = 0.0
        x[0, 2 % shape[1]] = 0.0
        x[3, 2 % shape[1]] = 0.0
    elif kind == "onezero":
        x = np.sign(x) * (0.8 + 0.4 * rng.random(shape))
        x[2, 1] = 0.0
    return x


def _check_grad_vs_numgrad(mesh, name, f, ref, x, want):
    """f(X).backward() on every non-Partial placement of x: the gradient against ``want`` (central
    differences of the NumPy reference), its placements equal to the input's, and the value."""
    probs = Problems()
    for px in combos(mesh, 2, partial=False):
        X = distribute_tensor(to_device(x), mesh, px, requires_grad=True)
        try:
            out = f(X)
            out.backward()
            got = to_host(X.grad.full_tensor())
            if not np.allclose(got, want, atol=1e-5):
                probs.append(f"{name} {px}: {got.ravel()[:6]} vs {want.ravel()[:6]}")
            if tuple(X.grad.placements) != tuple(px):
                probs.append(f"{name} {px}: gradient placements {X.grad.placements}")
            probs.check(f"{name} value {px}", np.asarray(to_host(out.detach().full_tensor())), np.asarray(ref(x)))
        except Exception as e:  # noqa: BLE001
            probs.append(f"{name} {px}: {type(e).__name__}: {e}")
    probs.done()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(4, 6), (5, 3)], ids=["even", "uneven"])
@pytest.mark.parametrize("case", UNARY_GRAD_CASES, ids=[c[0] for c in UNARY_GRAD_CASES])
def test_reduction_unary_gradients_vs_finite_differences(kind, shape, case):
    """max/min/prod/abs/sqrt (issue 12) over sharded (Partial('max'/'min'/'product') results, reduced
    afterwards) and replicated inputs, even and uneven (empty shards at 4 ranks): the gradient
    against central differences of the NumPy reference, with the input's placements."""
    mesh = mesh_of(kind)
    name, f, ref, inp = case
    x = _grad_input(shape, inp, 7)
    want = numgrad(ref, x)
    _check_grad_vs_numgrad(mesh, name, f, ref, x, want)


@pytest.mark.parametrize("kind", ["1d", "2x2"])
def test_max_min_gradient_ties_split_evenly(kind):
    """Ties (PyTorch's amax/amin convention): the gradient is split evenly among the elements equal
    to the result, counted over the whole reduced dim even when it is sharded."""
    mesh = mesh_of(kind)
    x = np.array([[1.0, 5.0, 2.0, 5.0], [5.0, 0.0, 5.0, -1.0], [2.0, 2.0, -3.0, 2.0], [0.0, 4.0, -3.0, 1.0]])
    want_max = (x == x.max()) / (x == x.max()).sum()
    want_min0 = (x == x.min(axis=0)) / (x == x.min(axis=0)).sum(axis=0)
    probs = Problems()
    for px in combos(mesh, 2, partial=False):
        for what, f, want in (("max", lambda X: X.max(), want_max), ("min0", lambda X: X.min(axis=0).sum(), want_min0)):
            X = distribute_tensor(to_device(x), mesh, px, requires_grad=True)
            try:
                f(X).backward()
                probs.check(f"{what} {px}", to_host(X.grad.full_tensor()), want)
            except Exception as e:  # noqa: BLE001
                probs.append(f"{what} {px}: {type(e).__name__}: {e}")
    probs.done()


@pytest.mark.parametrize("kind", KINDS)
def test_edge_values(kind):
    """NaN and inf, overflowing narrow ints, 0-d results and empty arrays, against NumPy."""
    mesh = mesh_of(kind)
    probs = Problems()
    f = np.array([[np.nan, 1.0, -np.inf], [np.inf, 2.0, 0.0], [3.0, -1.0, np.nan]])
    i8 = np.array([[100, 120, -128], [127, 5, -100], [1, 2, 3]], dtype=np.int8)
    e = np.zeros((0, 3))
    with np.errstate(all="ignore"):
        for pl in combos(mesh, 2, partial=False):
            F, I, E = make(f, mesh, pl), make(i8, mesh, pl), make(e, mesh, pl)
            try:
                with np.errstate(all="ignore"):
                    probs.check(f"nan+ {pl}", full(F + F * 2), f + f * 2)
                    probs.check(f"nan sum {pl}", full(F.sum(axis=0)), f.sum(axis=0))
                    probs.check(f"nan mean {pl}", full(F.mean()), f.mean())
                    probs.check(f"inf/0 {pl}", full(F / make(np.zeros((3, 3)), mesh, pl)), f / np.zeros((3, 3)))
                probs.check(f"int8 wrap {pl}", full(I + I), i8 + i8)
                probs.check(f"int8 sum {pl}", full(I.sum(axis=1)), i8.sum(axis=1))
                probs.check(f"int8 max {pl}", full(I.max(axis=0)), i8.max(axis=0))
                probs.check(f"0-d {pl}", full(F[1, 1:].sum() * 2 + 1), f[1, 1:].sum() * 2 + 1)
                probs.check(f"empty {pl}", full(E + 1), e + 1)
                probs.check(f"empty sum {pl}", full(E.sum(axis=0)), e.sum(axis=0))
                probs.check(f"empty T@ {pl}", full(E.T @ E), e.T @ e)
            except Exception as ex:  # noqa: BLE001
                probs.append(f"{pl}: {type(ex).__name__}: {ex}")
    probs.done()


# ------------------------------------------------------------------------------------------------
# autograd completeness (issue 12): predicates without gradient, sin/cos/minimum/positive, in place
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_predicates_on_tensors_that_require_grad(kind, shape):
    """Comparisons, isnan/isfinite, any/all on DTensors that require grad (leaves, Partial ones
    included, and intermediate results) give NumPy's values and results that do not require grad
    (PyTorch's rule), and leave the graph alone: a loss built from x afterwards backprops exactly."""
    mesh = mesh_of(kind)
    probs = Problems()
    a, b = ints(shape, 21), ints(shape, 22)
    with np.errstate(all="ignore"):
        q = a / a  # NaN where a == 0
    for pa in combos(mesh, 2):
        X = make(a, mesh, pa).requires_grad_()
        cases = [("x>0", lambda: X > 0, a > 0), ("x<=1", lambda: X <= 1, a <= 1), ("x.any()", lambda: X.any(), a.any()),
                 ("np.all(x,0)", lambda: np.all(X, axis=0), np.all(a, axis=0)),
                 ("x.all(1,keep)", lambda: X.all(axis=1, keepdims=True), a.all(axis=1, keepdims=True)),
                 ("np.any(x>2,1)", lambda: np.any(X > 2, axis=1), np.any(a > 2, axis=1)),
                 ("isnan(x/x)", lambda: np.isnan(X / X), np.isnan(q)), ("isfinite(x/x)", lambda: np.isfinite(X / X),
                                                                         np.isfinite(q))]
        for pb in combos(mesh, 2):
            Y = make(b, mesh, pb).requires_grad_()
            cases.append((f"x=={pb}", lambda Y=Y: X == Y, a == b))
        for name, f, want in cases:
            try:
                with np.errstate(all="ignore"):
                    r = f()
                if r.requires_grad:
                    probs.append(f"{name} {pa}: the result requires grad")
                probs.check(f"{name} {pa}", full(r), want)
            except Exception as e:  # noqa: BLE001
                probs.append(f"{name} {pa}: {type(e).__name__}: {e}")
        try:
            loss = np.where(X > 0, X, 0.5 * X).sum() + (X * X).sum()
            loss.backward()
            probs.check(f"grad after predicates {pa}", to_host(X.grad.full_tensor()), np.where(a > 0, 1.0, 0.5) + 2 * a)
        except Exception as e:  # noqa: BLE001
            probs.append(f"backward {pa}: {type(e).__name__}: {e}")
    probs.done()


# sin, cos, minimum, positive (and their method / NumPy spellings); random normals: no ties for minimum
ELEMENTWISE_GRAD_CASES = [
    ("sin", lambda X: (np.sin(X) * _c(X.shape[1])).sum(), lambda x: (np.sin(x) * _c(x.shape[1])).sum()),
    ("cos", lambda X: (np.cos(X) ** 2).sum(axis=0).sum(), lambda x: (np.cos(x) ** 2).sum()),
    ("sin*cos-methods", lambda X: (X.sin() * X.cos() + X).max(axis=0).sum(),
     lambda x: (np.sin(x) * np.cos(x) + x).max(axis=0).sum()),
    ("minimum-const", lambda X: (np.minimum(X, 0.2) * _c(X.shape[1])).sum(),
     lambda x: (np.minimum(x, 0.2) * _c(x.shape[1])).sum()),
    ("minimum-both", lambda X: np.minimum(X * 2, np.sin(X)).sum(axis=1).sum(), lambda x: np.minimum(2 * x, np.sin(x)).sum()),
    ("positive", lambda X: ((+X) * X).sum() + np.positive(X).mean(), lambda x: (x * x).sum() + x.mean()),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(4, 6), (5, 3)], ids=["even", "uneven"])
@pytest.mark.parametrize("case", ELEMENTWISE_GRAD_CASES, ids=[c[0] for c in ELEMENTWISE_GRAD_CASES])
def test_elementwise_gradients_vs_finite_differences(kind, shape, case):
    """The unary ops that mpilocal.ops lists (methods, NumPy ufuncs) are differentiable: against
    central differences of the NumPy reference, the gradient keeping the input's placements."""
    mesh = mesh_of(kind)
    name, f, ref = case
    x = _grad_input(shape, None, 9)
    want = numgrad(ref, x)
    _check_grad_vs_numgrad(mesh, name, f, ref, x, want)


@pytest.mark.parametrize("kind", KINDS)
def test_inplace_on_tensors_that_require_grad(kind):
    """PyTorch's rules: in place on a non-leaf (or with an operand that requires grad) is recorded;
    on a leaf that requires grad it raises on every rank, naming the rule and the fixes, and the
    leaf is unchanged; the result keeps the target's placements (else the placement error)."""
    mesh = mesh_of(kind)
    probs = Problems()
    x = _grad_input((5, 3), None, 11)
    for px in combos(mesh, 2, partial=False):
        X = distribute_tensor(to_device(x), mesh, px, requires_grad=True)
        try:
            y = X * 2
            y += 1
            if not y.requires_grad or y.is_leaf or tuple(y.placements) != tuple(px):
                probs.append(f"y += 1 {px}: requires_grad {y.requires_grad}, leaf {y.is_leaf}, {y.placements}")
            y.sum().backward()
            probs.check(f"y = x*2; y += 1 {px}", to_host(X.grad.full_tensor()), np.full(x.shape, 2.0))
            X.grad = None
            e = np.exp(X)  # Exp keeps its output for backward: the in-place ops must not overwrite it
            e += 1
            e *= X
            e -= X.sin()
            e.sum().backward()
            probs.check(f"exp chain value {px}", full(e.detach()), (np.exp(x) + 1) * x - np.sin(x))
            probs.check(f"exp chain grad {px}", to_host(X.grad.full_tensor()), np.exp(x) * x + np.exp(x) + 1 - np.cos(x))
            X.grad = None
            Z = make(np.zeros(x.shape, np.float32), mesh, px)  # no grad, float32: the operand brings the graph
            Z += X * 3
            if not Z.requires_grad or Z.dtype != np.float32:
                probs.append(f"Z += X*3 {px}: requires_grad {Z.requires_grad}, dtype {Z.dtype}")
            Z.sum().backward()
            probs.check(f"Z += X*3 grad {px}", to_host(X.grad.full_tensor()), np.full(x.shape, 3.0))
            try:
                X += 1
                probs.append(f"leaf += {px}: no error")
            except RuntimeError as err:
                if not all(w in str(err) for w in ("leaf Variable that requires grad", "mpilocal.no_grad()",
                                                   ".detach()")):
                    probs.append(f"leaf += {px}: {err}")
            probs.check(f"leaf unchanged {px}", full(X.detach()), x)
            with mpilocal.no_grad():
                X -= 1
            probs.check(f"no_grad -= {px}", full(X.detach()), x - 1)
            if not (X.requires_grad and X.is_leaf):
                probs.append(f"no_grad -= {px}: no longer a leaf that requires grad")
            r = X.redistribute(placements=[R] * mesh.ndim) * 1.0
            try:
                r += make(x, mesh, [S0] + [R] * (mesh.ndim - 1))  # the result would be Shard(0): not in place
                probs.append(f"placement-changing += on a non-leaf {px}: no error")
            except RuntimeError as err:
                if "in place needs the same" not in str(err):
                    probs.append(f"placement-changing += {px}: {err}")
        except Exception as e:  # noqa: BLE001
            probs.append(f"{px}: {type(e).__name__}: {e}")
    probs.done()


@pytest.mark.parametrize("kind", KINDS)
def test_inplace_on_a_constant_kept_for_backward(kind):
    """``z = (x * a).sum(); a += 1; z.backward()``: ``a`` (no grad) was kept by the multiply for its
    backward; the in-place update (outside and under no_grad) must not change what backward reads
    (the gradient of x is the old ``a``, as NumPy on the full arrays says), and ``a`` itself holds
    the new values. Without autograd involved, in place still writes into the shard (an earlier
    to_local() view sees it). It failed before: the gradient came out as the updated ``a``."""
    mesh = mesh_of(kind)
    shape = (2 * W + 1, 3)
    xv = np.arange(1.0, 1.0 + int(np.prod(shape))).reshape(shape)
    av = np.linspace(-2.0, 3.0, int(np.prod(shape))).reshape(shape)
    for pl in combos(mesh, 2, partial=False):
        x = distribute_tensor(to_device(xv), mesh, pl, requires_grad=True)
        a = distribute_tensor(to_device(av), mesh, pl)
        z = (x * a).sum()
        a += 1
        with no_grad():
            a *= 2
        z.backward()
        assert_all(np.array_equal(full(x.grad), av), f"{pl}: backward read the updated a: {full(x.grad)}")
        assert_all(np.array_equal(full(a), (av + 1) * 2), f"{pl}: a was not updated")
        b = distribute_tensor(to_device(av), mesh, pl)
        view = b.to_local()
        b += 1
        assert_all(np.array_equal(to_host(view), to_host(b.to_local())),
                   f"{pl}: without a graph, in place writes into the shard")
