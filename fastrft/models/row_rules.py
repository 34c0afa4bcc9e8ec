"""How the exact mode calls the CPU's GEMMs so that a row's result does not depend on its batch.

A BLAS picks its kernel by the problem's size, and two kernels can round a row differently. What each
one does was measured on this project's CPUs (bench/RESULTS.md):

- Intel Xeon, MKL fp32 with ``MKL_CBWR=AUTO,STRICT``: one order for every row count: one call serves;
- AMD EPYC (AVX2 only), MKL fp32: 1-3 rows round differently from 4 or more, whatever ``MKL_CBWR`` says;
  calls zero-padded to at least 4 rows agree with every larger call;
- oneDNN bf16 (AMX): 33..~700 rows round differently from 1..32; calls of exactly 32 rows agree with
  each other at every position of a row in the block;
- numpy's OpenBLAS with AVX2 kernels (the Triton interpreter's ``tl.dot``): a row's bits depend on its
  position in a fixed-shape product (fastrft.kernels.exact_triton computes those dots row by row).

So nothing is assumed of the machine. A :class:`RowRule` says how a GEMM with a fixed right operand
(a linear layer, the LM head, an attention tile) is cut into calls; at start-up :func:`choose` gives each
such GEMM (a :class:`Site`) the first rule of its dtype's list :data:`RULES` under which every row comes
out with the same bits in every pattern of calls the run makes: one row alone, a decode batch, a prefill,
the training forward's hundreds or thousands of rows, the row at other offsets of its block. The lists are
ordered by measured cost (bench/RESULTS.md, "What each row rule costs"): one plain call; calls padded to
at least P rows (free above P); calls of exactly B rows (fixed blocks: 1.5-2x the plain GEMM time at
SmolLM2's shapes in fp32 training forwards, so they come last there; bf16 starts with them, its measured
oneDNN behaviour). A site that no
rule makes invariant raises :class:`RowRuleError` naming the rules tried.

Optional fast paths are probed the same way, never assumed: oneDNN's pre-packed bf16 weights (which the
engine's and the KL reference's forwards use) must exist on this CPU (they need AVX-512 or AVX-NE-CONVERT)
and must give the rule's bits, or the plain calls are used.

Every GEMM of the exact CPU path goes through :func:`gemm`, which is also where the tests put a
simulated BLAS that rounds by row count (tests/models/test_row_rules.py).
"""

from __future__ import annotations

import dataclasses

import torch


class RowRuleError(RuntimeError):
    """No rule of :data:`RULES` makes this GEMM's rows batch-invariant on this machine's BLAS."""


@dataclasses.dataclass(frozen=True)
class RowRule:
    """block: rows per GEMM call (0: every row in one call, whatever their number); pad_to: a call of
    fewer rows is zero-padded to this many (1: never). Fixed blocks are ``RowRule(B, B)``."""

    block: int = 0
    pad_to: int = 1

    def __str__(self) -> str:
        if self.block:
            return f"blocks of {self.block} rows" + (", padded" if self.pad_to == self.block else "")
        return "one call" + (f" padded to >= {self.pad_to} rows" if self.pad_to > 1 else "")

    def calls(self, m: int) -> list[tuple[int, int]]:
        """(first row, rows) of each call for m rows."""
        step = self.block or max(m, 1)
        return [(i, min(step, m - i)) for i in range(0, m, step)]

    def run(self, fn, *rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fn over ``rows`` (tensors sharing their row dim, -2) cut into this rule's calls:
        fn(*pieces, dest) -> (..., n, N), written into ``dest`` (the pieces' slice of ``out``) when that is
        not None. Pieces of fewer than ``pad_to`` rows are zero-padded (False for a bool tensor) and the
        padding's rows dropped from the result."""
        m = rows[0].shape[-2]
        calls = self.calls(m)
        if not calls or (out is None and len(calls) == 1 and m >= self.pad_to):
            return fn(*rows, out)
        parts = []
        for start, n in calls:
            pieces = [x.narrow(-2, start, n) for x in rows]
            dest = None if out is None else out.narrow(-2, start, n)
            if n < self.pad_to:
                part = fn(*(_pad_rows(x, self.pad_to) for x in pieces), None).narrow(-2, 0, n)
                if dest is not None:
                    dest.copy_(part)
            else:
                part = fn(*pieces, dest)
            parts.append(part)
        if out is not None:
            return out
        return parts[0] if len(parts) == 1 else torch.cat(parts, -2)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with zero rows appended along dim -2 up to ``rows`` (a bool x gets False rows)."""
    pad = x.new_zeros(*x.shape[:-2], rows - x.shape[-2], x.shape[-1])
    return torch.cat([x, pad], -2)


PLAIN = RowRule()
# Per dtype, cheapest first (bench/RESULTS.md, "What each row rule costs"). fp32: a plain call (Intel's MKL in CNR mode),
# calls padded to a few rows (AMD's MKL), fixed blocks last. bf16: oneDNN's 32-row blocks first, whose
# small calls agree with a full block on Intel (no padding of a decode batch), then the same padded.
_FIXED = [RowRule(b, b) for b in (32, 64, 16, 8, 4)]
RULES = {torch.float32: [PLAIN, *(RowRule(0, p) for p in (2, 4, 8, 16, 32)), *_FIXED],
         torch.bfloat16: [RowRule(32, 1), *_FIXED, PLAIN, *(RowRule(0, p) for p in (2, 4, 8, 16, 32))]}


def gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, packed: torch.Tensor | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """The one BLAS call of the exact CPU ops: a (..., M, K) @ b (..., K, N) (+ bias (N,)), or a 2-D ``a``
    times oneDNN's pre-packed weight ``packed`` (b is then the plain weight's transpose, unused)."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(a, packed, bias, "none", [], "")
    if a.dim() > 2:
        return torch.matmul(a, b, out=out)
    if bias is not None:
        return torch.addmm(bias, a, b, out=out) if out is not None else torch.addmm(bias, a, b)
    return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)


def reorder(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """oneDNN's pre-packed layout of a (N, K) weight for ``rows``-row GEMMs (raises RuntimeError on a CPU
    without the instructions its bf16 path needs)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


# ----------------------------------------------------------------------------------------- sites
@dataclasses.dataclass(frozen=True)
class Site:
    """A GEMM whose right operand's shape is fixed: a linear layer or the LM head (k, n: in and out
    features), or an attention tile (kind "attention", k: the head dim, n: query heads per kv head; its
    other size follows the context, in whole 64-key tiles)."""

    kind: str
    k: int
    n: int
    dtype: torch.dtype
    bias: bool = False

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        if self.kind == "attention":
            return f"the attention tiles of head dim {self.k}, {self.n} query heads per kv head ({dt})"
        what = "the LM head" if self.kind == "head" else "a linear layer"
        return f"{what} of {self.k} x {self.n} ({dt}{', with bias' if self.bias else ''})"


@dataclasses.dataclass(frozen=True)
class Choice:
    rule: RowRule
    packed: bool = False  # no-grad forwards multiply by oneDNN's pre-packed weight


_CHOSEN: dict[Site, Choice] = {}


def choose(site: Site) -> Choice:
    """The site's rule on this process's BLAS, found once (:func:`probe`) and kept."""
    if site not in _CHOSEN:
        _CHOSEN[site] = probe(site)
    return _CHOSEN[site]


def chosen() -> dict[Site, Choice]:
    """The choices made so far in this process (for reports)."""
    return dict(_CHOSEN)


def forget() -> None:
    """Drop every choice (tests that swap the BLAS under :func:`gemm`)."""
    _CHOSEN.clear()


# The row counts and offsets a row is checked at: one row, decode batches, prefill chunks and training
# forwards, each call starting at an offset that moves a row within its block.
COUNTS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 100, 127, 128, 129, 200, 255, 256,
          300, 511, 700, 1024, 2048)
OFFSETS = (0, 1, 2, 3, 5, 8, 13, 31, 37)
# A rule that makes one call of any row count (block 0) is only as good as the counts it was checked at:
# at least 300 rows (2,048 where one call costs at most _CHECK_FLOPS), never fewer. Fixed blocks are
# invariant by construction once a row's place in its block is checked: three blocks' worth of rows.
MIN_TOP, _CHECK_FLOPS = 300, 4e9


def probe(site: Site) -> Choice:
    """The first rule of RULES[site.dtype] under which ``site``'s rows are batch-invariant here, with
    the pre-packed fast path if it exists and agrees; RowRuleError when none is."""
    gen = torch.Generator().manual_seed(site.k * 7919 + site.n)
    cases = _operands(site, gen)
    tried = []
    for rule in RULES[site.dtype]:
        if all(_invariant(rule, *case[:3], _counts_for(rule, case[3]), case[4]) for case in cases):
            packed = site.kind == "linear" and site.dtype == torch.bfloat16 and _packing_agrees(rule, cases[0])
            return Choice(rule, packed)
        tried.append(str(rule))
    raise RowRuleError(f"{site} gives a row different bits in different batches; rules tried: {'; '.join(tried)}")


def _operands(site: Site, gen) -> list[tuple]:
    """[(a, b, bias or None, row counts, contiguous pieces)] laid out as the site's real calls are: a
    linear layer's weight is the transpose of an (out, in) tensor; attention multiplies batched tiles, its
    K^T a transposed view, its pieces made contiguous (fastrft.models.tiled_attention)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(site.dtype)

    if site.kind != "attention":
        top = max(MIN_TOP, min(COUNTS[-1], int(_CHECK_FLOPS / (2 * site.k * site.n))))
        counts = [c for c in COUNTS if c <= top]
        a = randn(counts[-1] + max(OFFSETS), site.k)
        return [(a, randn(site.n, site.k).T, randn(site.n) if site.bias else None, counts, False)]
    # Scores (rows x head dim) @ K^T and weights (rows x keys) @ V over contexts of 1 and 3 tiles; the
    # rows of one kv head's tile are its (query head, token) pairs, up to G * 64 of them (n = G).
    counts = [c for c in COUNTS if c <= max(64, 64 * site.n)]
    rows = counts[-1] + max(OFFSETS)
    cases = []
    for keys in (64, 192):
        cases.append((randn(2, rows, site.k), randn(2, keys, site.k).transpose(-1, -2), None, counts, True))
        cases.append((randn(2, rows, keys).softmax(-1), randn(2, keys, site.k), None, counts, True))
    return cases


def _counts_for(rule: RowRule, counts: list[int]) -> list[int]:
    return [c for c in counts if c <= 3 * rule.block + 5] if rule.block else counts


def _invariant(rule: RowRule, a, b, bias, counts, contiguous, packed=None) -> bool:
    """Whether rows [s, s + c) computed alone equal the same rows of one big call, for every count c
    (at offsets s that cycle through OFFSETS), under ``rule``; batched operands also as a batch of one."""
    def run(x, bb):
        if contiguous:
            return rule.run(lambda piece, _: gemm(piece.contiguous(), bb), x)
        return rule.run(lambda piece, _: gemm(piece, bb, bias, packed), x)

    full = run(a[..., : counts[-1] + max(OFFSETS), :], b)
    for i, c in enumerate(counts):
        s = OFFSETS[i % len(OFFSETS)]
        if not torch.equal(run(a[..., s:s + c, :], b), full[..., s:s + c, :]):
            return False
    return a.dim() == 2 or torch.equal(run(a[:1, 5:8], b[:1]), full[:1, 5:8])


def _packing_agrees(rule: RowRule, case) -> bool:
    """oneDNN's pre-packed weight exists on this CPU and gives the rule's bits in every call pattern.
    Only fixed blocks pack (the weight is laid out for their row count)."""
    if not (rule.block and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    a, b, bias, counts, _ = case
    try:
        packed = reorder(b.T.contiguous(), rule.block)
        plain = rule.run(lambda piece, _: gemm(piece, b, bias), a)
        return all(torch.equal(rule.run(lambda piece, _: gemm(piece, b, bias, packed), a[s:s + c]), plain[s:s + c])
                   for s, c in zip(OFFSETS * 4, _counts_for(rule, counts)))
    except RuntimeError:  # "bf16 path needs the cpu support avx_ne_convert or avx512bw, ...": an AVX2 CPU
        return False
