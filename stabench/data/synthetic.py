"""Generated tasks: classic long-range and depth problems whose data is drawn from a seeded
generator.

Each factory takes the problem's size parameters (sequence length T, sample counts, seed) as
arguments, so `--set dataset.T=200` makes the problem harder without any file on disk.
"""

from __future__ import annotations

import numpy as np

from .dataset import DATASETS, Dataset, Meta, Source


def _generated(name: str, meta: Meta, make) -> Source:
    def load(data_dir=None) -> Dataset:
        return make()

    return Source(name, meta, load, where=lambda data_dir: "generated", kind="generated")


def _check_sizes(n_train: int, n_test: int) -> None:
    if n_train <= 0 or n_test <= 0:
        raise ValueError("n_train and n_test must be positive")


# ---- adding problem ---------------------------------------------------------------------------
@DATASETS.register(
    "adding", help="adding problem: sum the two marked values of a length-T sequence (regression)",
    ref="Hochreiter & Schmidhuber 1997; Pascanu et al. 2013")
def adding(T: int = 100, n_train: int = 10000, n_test: int = 1000, seed: int = 0) -> Source:
    """Inputs [T, 2]: a value drawn from U(0, 1) and a marker channel with exactly two ones, one in
    each half of the sequence. Target: the sum of the two marked values. Always predicting its mean
    1.0 gives MSE Var(u1 + u2) = 2/12 = 1/6; the problem counts as solved below MSE 0.04."""
    if T < 2:
        raise ValueError("T must be at least 2")
    _check_sizes(n_train, n_test)
    meta = Meta(x_shape=(T, 2), x_dtype="float32", num_outputs=1, n_train=n_train, n_test=n_test,
                task_type="regression")

    def make() -> Dataset:
        x, y = adding_examples(np.random.default_rng(seed), n_train + n_test, T)
        return Dataset(meta, x[:n_train], y[:n_train], x[n_train:], y[n_train:])

    return _generated("adding", meta, make)


def adding_examples(rng: np.random.Generator, n: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    values = rng.uniform(0.0, 1.0, (n, T))
    first = rng.integers(0, T // 2, n)
    second = rng.integers(T // 2, T, n)
    markers = np.zeros((n, T))
    rows = np.arange(n)
    markers[rows, first] = markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (values[rows, first] + values[rows, second]).astype(np.float32)
    return x, y


# ---- temporal order ---------------------------------------------------------------------------
TEMPORAL_SYMBOLS = 6  # four distractors a, b, c, d and the two informative symbols X, Y
X_SYMBOL, Y_SYMBOL = 4, 5


@DATASETS.register(
    "temporal_order",
    help="temporal order: classify the order of two symbols (X/Y) hidden among distractors, "
         "4 classes",
    ref="Hochreiter & Schmidhuber 1997; Pascanu et al. 2013")
def temporal_order(T: int = 100, n_train: int = 10000, n_test: int = 1000, seed: int = 0) -> Source:
    """One-hot inputs [T, 6]: random distractors, except one X-or-Y symbol at a random position in
    [0.1T, 0.2T) and another in [0.5T, 0.6T). Class = 2 * first + second (XX, XY, YX, YY): chance
    cross-entropy is ln 4."""
    if T < 10:
        raise ValueError("T must be at least 10")
    _check_sizes(n_train, n_test)
    meta = Meta(x_shape=(T, TEMPORAL_SYMBOLS), x_dtype="float32", num_outputs=4,
                n_train=n_train, n_test=n_test)

    def make() -> Dataset:
        x, y = temporal_order_examples(np.random.default_rng(seed), n_train + n_test, T)
        return Dataset(meta, x[:n_train], y[:n_train], x[n_train:], y[n_train:])

    return _generated("temporal_order", meta, make)


def temporal_order_examples(rng: np.random.Generator, n: int, T: int):
    symbols = rng.integers(0, X_SYMBOL, (n, T))  # distractors
    rows = np.arange(n)
    first_at = rng.integers(int(0.1 * T), int(0.2 * T), n)
    second_at = rng.integers(int(0.5 * T), int(0.6 * T), n)
    first, second = rng.integers(0, 2, n), rng.integers(0, 2, n)  # 0 = X, 1 = Y
    symbols[rows, first_at] = X_SYMBOL + first
    symbols[rows, second_at] = X_SYMBOL + second
    x = np.eye(TEMPORAL_SYMBOLS, dtype=np.float32)[symbols]
    return x, (2 * first + second).astype(np.int32)


# ---- ListOps ----------------------------------------------------------------------------------
LISTOPS_OPS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_END = "]"
# Token ids: 0 pads; digits 0-9 are 1-10; then the operators and the closing bracket.
LISTOPS_VOCAB = ("<pad>", *map(str, range(10)), *LISTOPS_OPS, LISTOPS_END)
LISTOPS_IDS = {tok: i for i, tok in enumerate(LISTOPS_VOCAB)}
VALUE_P = 0.25  # as in Long Range Arena: below max depth a node is an operator with p = 0.25
LISTOPS_MAX_MISSES = 100_000  # draws in a row with no new expression that fits: give up


def _apply(op: str, args: list[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return int(np.median(args))  # LRA's definition: the median, truncated to an integer
    return sum(args) % 10


def _listops_tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int):
    """(tokens, value) of a random expression, valued while it is built."""
    if depth >= max_depth or rng.random() > VALUE_P:
        v = int(rng.integers(0, 10))
        return [str(v)], v
    op = LISTOPS_OPS[rng.integers(0, len(LISTOPS_OPS))]
    tokens, values = [op], []
    for _ in range(int(rng.integers(2, max_args + 1))):
        sub, value = _listops_tree(rng, depth + 1, max_depth, max_args)
        tokens += sub
        values.append(value)
    return tokens + [LISTOPS_END], _apply(op, values)


def evaluate_listops(tokens) -> int:
    """Reference evaluator: the value of a token sequence, read left to right with a stack."""
    stack: list[tuple[str, list[int]]] = [("", [])]
    for tok in tokens:
        if tok in LISTOPS_OPS:
            stack.append((tok, []))
        elif tok == LISTOPS_END:
            op, args = stack.pop()
            stack[-1][1].append(_apply(op, args))
        else:
            stack[-1][1].append(int(tok))
    (_, (value,)), = stack
    return value


def listops_expressions(rng: np.random.Generator, n: int, max_depth: int, max_args: int,
                        min_length: int, max_length: int) -> list[tuple[list[str], int]]:
    """n distinct random expressions with min_length <= tokens <= max_length, and their values."""
    seen, out, misses = set(), [], 0
    while len(out) < n:
        tokens, value = _listops_tree(rng, 1, max_depth, max_args)
        key = " ".join(tokens)
        if min_length <= len(tokens) <= max_length and key not in seen:
            seen.add(key)
            out.append((tokens, value))
            misses = 0
        elif (misses := misses + 1) == LISTOPS_MAX_MISSES:  # the settings allow too few
            raise ValueError(f"listops found only {len(out)} of {n} distinct expressions of "
                             f"{min_length}-{max_length} tokens (max_depth={max_depth}, "
                             f"max_args={max_args}): widen the lengths or lower n_train, n_test")
    return out


def listops_longest(max_depth: int, max_args: int) -> int:
    """Tokens of the longest expression: every node below max_depth an operator of max_args."""
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


@DATASETS.register(
    "listops", help="ListOps: value (0-9) of nested MAX/MIN/MED/SUM-mod-10 expressions, as tokens",
    ref="Nangia & Bowman 2018; Tay et al. 2021 (Long Range Arena)")
def listops(max_depth: int = 5, max_args: int = 10, min_length: int = 16, max_length: int = 256,
            n_train: int = 10000, n_test: int = 1000, seed: int = 0) -> Source:
    """Expressions such as `[MAX 2 9 [MIN 4 7 ] 0 ]` drawn as in Long Range Arena (operator with
    p = 0.25 below max_depth, 2..max_args arguments), distinct, padded with 0 to max_length
    tokens."""
    if max_depth < 2 or max_args < 2:
        raise ValueError("max_depth and max_args must be at least 2")
    if not 3 <= min_length <= max_length:
        raise ValueError("need 3 <= min_length <= max_length")
    if max_length < 4:
        raise ValueError("max_length must be at least 4, the shortest expression `[OP a b ]`")
    longest = listops_longest(max_depth, max_args)
    if longest < min_length:
        raise ValueError(f"the longest expression of max_depth={max_depth} and "
                         f"max_args={max_args} has {longest} tokens, fewer than "
                         f"min_length={min_length}")
    _check_sizes(n_train, n_test)
    meta = Meta(x_shape=(max_length,), x_dtype="int32", num_outputs=10, n_train=n_train,
                n_test=n_test, vocab_size=len(LISTOPS_VOCAB))

    def make() -> Dataset:
        exprs = listops_expressions(np.random.default_rng(seed), n_train + n_test, max_depth,
                                    max_args, min_length, max_length)
        x = np.zeros((len(exprs), max_length), np.int32)
        for i, (tokens, _) in enumerate(exprs):
            x[i, :len(tokens)] = [LISTOPS_IDS[t] for t in tokens]
        y = np.array([v for _, v in exprs], np.int32)
        return Dataset(meta, x[:n_train], y[:n_train], x[n_train:], y[n_train:])

    return _generated("listops", meta, make)


# ---- teacher-student regression ---------------------------------------------------------------
@DATASETS.register(
    "teacher", help="regression on a fixed random tanh teacher network: depth studies without data",
    ref="Gardner & Derrida 1989; Saxe et al. 2014 (teacher-student setups)")
def teacher(in_dim: int = 32, outputs: int = 1, depth: int = 2, width: int = 64,
            n_train: int = 8192, n_test: int = 2048, noise: float = 0.0, seed: int = 0) -> Source:
    """x ~ N(0, I); y = teacher(x) + noise * N(0, 1), where the teacher is a tanh MLP with
    N(0, 1/fan_in) weights. Targets are standardized with the training split's mean and std, so
    predicting zero scores MSE about 1."""
    if min(in_dim, outputs, depth, width) <= 0:
        raise ValueError("in_dim, outputs, depth and width must be positive")
    if noise < 0:
        raise ValueError("noise must be non-negative")
    _check_sizes(n_train, n_test)
    meta = Meta(x_shape=(in_dim,), x_dtype="float32", num_outputs=outputs, n_train=n_train,
                n_test=n_test, task_type="regression", y_shape=(outputs,))

    def make() -> Dataset:
        rng = np.random.default_rng(seed)
        dims = [in_dim] + [width] * depth + [outputs]
        weights = [rng.standard_normal((a, b)) / np.sqrt(a) for a, b in zip(dims[:-1], dims[1:])]
        x = rng.standard_normal((n_train + n_test, in_dim))
        h = x
        for w in weights[:-1]:
            h = np.tanh(h @ w)
        y = h @ weights[-1] + noise * rng.standard_normal((len(x), outputs))
        mean, std = y[:n_train].mean(0), y[:n_train].std(0)
        y = (y - mean) / std
        x, y = x.astype(np.float32), y.astype(np.float32)
        return Dataset(meta, x[:n_train], y[:n_train], x[n_train:], y[n_train:])

    return _generated("teacher", meta, make)
