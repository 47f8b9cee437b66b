"""Weight-only quantization: blocked 4/8-bit weights, their kernels, packing and rounding.

Weight-only mode keeps activations in float and stores each large weight as small integer
codes with one scale (and zero point) per run of ``block_size`` elements along the reduction
axis. This module holds the arithmetic (block qparams, RTN / GPTQ / AWQ rounding, the packing
onnxruntime's contrib kernels read) and, in :data:`WEIGHT_ONLY_KERNELS`, the facts about the
kernels weight-only lowering emits; the ``quantize-weights`` pass, ``check`` and ``simulate``
all read them from here (one table: the lead moves it into the shared kernel table).

Packing (onnxruntime contrib ops, ``MatMulNBits``): B is uint8 ``[N, k_blocks, blob]`` with
``blob = block_size * bits / 8``; codes run along K, low bits first (element 2i in the low
nibble of byte i for 4 bits). Scales are ``[N * k_blocks]`` in A's float type; zero points are
uint8, each column's ``k_blocks`` codes packed the same way and padded to a whole byte; absent
zero points mean ``2^(bits-1)``. Dequantized weight: ``(code - zp) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .quant import QType, compute_qparams, gptq_round

__all__ = ["WeightOnlyKernel", "WEIGHT_ONLY_KERNELS", "WeightOnlyOptions", "BlockQuantized", "BITS", "BLOCK_SIZES",
           "ALGORITHMS", "block_quantize", "pack_codes", "unpack_codes", "dequantize_blocks", "matmul_nbits",
           "gather_block_quantized", "awq_search", "AWQ_ALPHAS", "release_pages"]

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128)
ALGORITHMS = ("rtn", "gptq", "awq")
AWQ_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # s = rms(x)^alpha; alpha 0 is plain RTN
AWQ_RANK = 128  # error of a candidate measured in the top eigen-directions of the input moments
AWQ_COLUMNS = 1024  # output columns of each weight the candidates are compared on
CHUNK_ELEMENTS = 1 << 22  # weights quantized at a time (16 MB of float32)
ROW_ELEMENTS = 1 << 15  # the clipping search's working set (128 KB of float32: in the L2 cache)
# block ranges tried (fractions of the block's range); the least squared rounding error wins.
# Measured on MiniLM int4 block 32 (docs/benchmarks.md): clipping lowers weight error ~10%.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass(frozen=True)
class WeightOnlyKernel:
    """Where a weight-only kernel keeps its operands (a fact of the kernel, not of a target):
    the float op it replaces, its domain, the input positions of the quantized weight, its
    scales and zero points, its attributes. Outputs are float (no output qparams)."""

    float_op: str
    domain: str
    weight: int
    scale: int
    zero_point: int
    attrs: tuple[str, ...]
    float_output: bool = True
    dynamic: bool = False


# The facts about the kernels weight-only lowering emits. "DequantizeLinear" is the blocked
# (opset 21, `block_size`) DQ feeding a float MatMul: the QDQ targets' form.
def _weight_only_kernels() -> dict[str, WeightOnlyKernel]:
    from .kernels import KERNELS

    out: dict[str, WeightOnlyKernel] = {}
    for spec in KERNELS.values():
        if spec.weight_only:
            opd = spec.inputs[spec.weight or 0]
            assert opd is not None and opd.scale is not None and opd.zero_point is not None
            out[spec.name] = WeightOnlyKernel(spec.float_op, spec.domains[0], weight=opd.value, scale=opd.scale,
                                              zero_point=opd.zero_point, attrs=tuple(spec.attrs or ()))
    # the standard op (opset 21 `block_size`), a fact of ONNX rather than a kernel
    out["DequantizeLinear"] = WeightOnlyKernel("MatMul", "", weight=0, scale=1, zero_point=2,
                                               attrs=("axis", "block_size"))
    return out


WEIGHT_ONLY_KERNELS: dict[str, WeightOnlyKernel] = _weight_only_kernels()


@dataclass(frozen=True)
class WeightOnlyOptions:
    """The user's weight-only choices (CLI ``--weight-*`` flags, ``compile(weight_*=...)``)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    algorithm: str = ""  # "" -> the best measured with calibration data, rtn without

    def validate(self, *, has_data: bool) -> "WeightOnlyOptions":
        if self.bits not in BITS:
            raise UserError(f"--weight-bits {self.bits}: must be one of {', '.join(map(str, BITS))}")
        if self.block_size not in BLOCK_SIZES:
            raise UserError(f"--block-size {self.block_size}: must be one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.algorithm and self.algorithm not in ALGORITHMS:
            raise UserError(f"--weight-algorithm {self.algorithm}: must be one of {', '.join(ALGORITHMS)}")
        if self.algorithm in ("gptq", "awq") and not has_data:
            raise UserError(f"--weight-algorithm {self.algorithm}: needs calibration data (--calibration PATH); "
                            "rtn needs none")
        return self

    def qtype(self) -> QType:
        """Codes are unsigned (what the kernels store), all 2^b levels; symmetric ones sit
        around the implicit zero point 2^(b-1) (see _block_params)."""
        return QType("uint8", self.symmetric, 0, 2**self.bits - 1, False)


@dataclass
class BlockQuantized:
    """One weight [K, N] quantized in blocks along K: codes [N, k_blocks * block] (uint8, the
    padding past K is the zero point), scale and zp [N, k_blocks]; ``act_scale`` [K] (AWQ) is
    what the activation must be divided by for the codes to apply (None: no scaling)."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    k: int
    bits: int
    block_size: int
    symmetric: bool
    act_scale: np.ndarray | None = None

    @property
    def k_blocks(self) -> int:
        return self.scale.shape[1]

    def packed(self) -> np.ndarray:
        n = self.codes.shape[0]
        return pack_codes(self.codes, self.bits).reshape(n, self.k_blocks, self.block_size * self.bits // 8)

    def packed_zero_points(self) -> np.ndarray | None:
        if self.symmetric:
            return None
        return pack_codes(self.zero_point.astype(np.uint8), self.bits).reshape(-1)

    def dequantized(self) -> np.ndarray:
        """The float weight [K, N] the kernel computes with (AWQ scaling undone)."""
        w = dequantize_blocks(self.codes, self.scale, self.zero_point, self.k, self.block_size)
        return w if self.act_scale is None else w / self.act_scale[:, None].astype(np.float32)


def _blocks(wt: np.ndarray, block: int) -> np.ndarray:
    """[N, K] -> [N, k_blocks, block], zero-padded past K (zero is exact in every block)."""
    n, k = wt.shape
    nb = -(-k // block)
    if nb * block != k:
        wt = np.concatenate([wt, np.zeros((n, nb * block - k), dtype=wt.dtype)], axis=1)
    return wt.reshape(n, nb, block)


def _block_params(wt: np.ndarray, opts: WeightOnlyOptions,
                  codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-block scale and zero point [N, k_blocks]: the block's range shrunk by the factor in
    CLIP_RATIOS whose round-to-nearest error (sum of squares over the block) is smallest; with
    ``codes`` ([N, k_blocks * block] uint8), also their round-to-nearest codes (what _rtn gives).

    The search is most of an rtn compile (1.1B decoder). The candidates' qparams are computed
    once for all blocks; the errors over groups of rows small enough to stay in the CPU cache
    (ROW_ELEMENTS) while every candidate is tried (and the winner's codes written), in units of
    the candidate's scale: ``s^2 * sum((clip(rint(x)) - x)^2)`` with ``x = w / s + zp`` (zp is a
    whole number, so this is the rounding _rtn does; the clip bounds are scalars: numpy's fast
    path)."""
    b = _blocks(wt, opts.block_size)
    n, nb, block = b.shape
    ext = _extremes(b, opts)
    cands = [_range_params(ext, opts, ratio) for ratio in CLIP_RATIOS]
    scales = np.stack([s for s, _ in cands])
    zps = np.stack([z for _, z in cands])
    inv = (1.0 / scales)[..., None]
    off = zps.astype(np.float32)[..., None]
    scale = np.empty((n, nb), np.float32)
    zp = np.empty((n, nb), np.int64)
    step = max(1, ROW_ELEMENTS // (nb * block))
    x = np.empty((min(step, n), nb, block), np.float32)
    r = np.empty_like(x)
    err = np.empty((len(cands), min(step, n), nb), np.float32)
    top = np.float32(2**opts.bits - 1)
    for r0 in range(0, n, step):
        rows = b[r0:r0 + step]
        m = len(rows)
        xs, rs = x[:m], r[:m]
        for i in range(len(cands)):
            np.multiply(rows, inv[i, r0:r0 + m], out=xs)
            xs += off[i, r0:r0 + m]
            np.rint(xs, out=rs)
            np.clip(rs, 0, top, out=rs)
            rs -= xs
            np.einsum("ijk,ijk->ij", rs, rs, out=err[i, :m])
        e = err[:, :m] * np.square(scales[:, r0:r0 + m])
        best = e.argmin(axis=0)[None]  # the first (widest) candidate wins ties
        scale[r0:r0 + m] = np.take_along_axis(scales[:, r0:r0 + m], best, axis=0)[0]
        zp[r0:r0 + m] = np.take_along_axis(zps[:, r0:r0 + m], best, axis=0)[0]
        if codes is not None:
            np.multiply(rows, (1.0 / scale[r0:r0 + m])[..., None], out=xs)
            xs += zp[r0:r0 + m].astype(np.float32)[..., None]
            np.rint(xs, out=xs)
            np.clip(xs, 0, top, out=xs)
            codes[r0:r0 + m] = xs.reshape(m, -1)
    return scale, zp


def _extremes(b: np.ndarray, opts: WeightOnlyOptions) -> tuple[np.ndarray, ...]:
    """What the block qparams are made from: the signed largest-magnitude value (symmetric),
    or the minimum and maximum, of each block of ``b`` [N, k_blocks, block]."""
    if opts.symmetric:
        idx = np.abs(b).argmax(axis=2)[..., None]
        return (np.take_along_axis(b, idx, axis=2)[..., 0].astype(np.float64),)
    return b.min(axis=2), b.max(axis=2)


def _range_params(ext: tuple[np.ndarray, ...], opts: WeightOnlyOptions, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Block qparams covering ``ratio`` times the range of :func:`_extremes` (1.0: all of it)."""
    if opts.symmetric:
        # the block's largest-magnitude value maps exactly onto code 0 (-2^(b-1) steps): the
        # scale carries its sign, so all 2^b levels are used whichever sign the extreme has
        # (an absmax / (2^(b-1)-1) scale wastes one level, absmax / 2^(b-1) clips the extreme)
        half = 2 ** (opts.bits - 1)
        scale = (ext[0] * ratio / -half).astype(np.float32)
        scale = np.where(np.abs(scale) > np.finfo(np.float32).tiny, scale, np.float32(1.0))
        return scale, np.full(scale.shape, half, dtype=np.int64)
    qp = compute_qparams(ext[0] * ratio, ext[1] * ratio, opts.qtype())
    return qp.scale.astype(np.float32), qp.zero_point.astype(np.int64)


def _rtn(wt: np.ndarray, scale: np.ndarray, zp: np.ndarray, opts: WeightOnlyOptions) -> np.ndarray:
    """Codes [N, k_blocks * block] (uint8) of ``wt`` [N, K] for the given block qparams: the
    nearest of ``w * (1/s)`` (the search above measures the same rounding)."""
    qt = opts.qtype()
    b = _blocks(wt, opts.block_size)
    q = b * (1.0 / scale)[..., None]
    q += zp.astype(np.float32)[..., None]
    np.rint(q, out=q)
    np.clip(q, qt.qmin, qt.qmax, out=q)
    return q.astype(np.uint8).reshape(wt.shape[0], -1)


def block_quantize(w: np.ndarray, opts: WeightOnlyOptions, algorithm: str = "rtn",
                   hessian: np.ndarray | None = None, act_scale: np.ndarray | None = None) -> BlockQuantized:
    """Quantize a MatMul weight ``w`` [K, N] (float) in blocks of ``opts.block_size`` along K.

    ``rtn``: round to nearest with min/max (or absmax) block qparams. ``gptq``: the same
    qparams, codes chosen column by column against the input second moments ``hessian``
    [K, K] (quant.gptq_round, shared with insert-qdq). ``awq``: :func:`awq_search`'s
    per-input-channel scale, then RTN of the scaled weight. ``act_scale`` [K]: an AWQ scale
    already chosen (for every layer sharing the input): the weight is scaled chunk by chunk as
    it is quantized, never as a whole float copy.
    """
    k, n = w.shape
    if algorithm == "awq" and act_scale is None:
        if hessian is None:
            raise UserError("weight-only awq: no input statistics for a layer")
        act_scale = awq_search([np.asarray(w, dtype=np.float32)], hessian, opts)
    # columns are independent: quantize CHUNK_ELEMENTS weights at a time, so the float
    # temporaries stay small whatever the weight's size (w may be a memory map)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    nb = -(-k // opts.block_size)
    codes = np.empty((n, nb * opts.block_size), np.uint8)
    scale = np.empty((n, nb), np.float32)
    zp = np.empty((n, nb), np.uint8)
    for c0 in range(0, n, step):
        wc = np.asarray(w[:, c0:c0 + step], dtype=np.float32)
        if act_scale is not None:
            wc = wc * act_scale[:, None]
        wt = np.ascontiguousarray(wc.T)  # [cols, K]: blocks run along K
        cols = slice(c0, c0 + wt.shape[0])
        if algorithm == "gptq" and hessian is not None:
            s, z = _block_params(wt, opts)
            codes[cols] = c = _gptq(wt, hessian, s, z, opts)
            s = _refit_scales(wt, c, s, z, hessian, opts.block_size)
        else:
            s, z = _block_params(wt, opts, codes[cols])
        scale[cols], zp[cols] = s, z
    return BlockQuantized(codes, scale, zp, k, opts.bits, opts.block_size, opts.symmetric, act_scale)


def _refit_scales(wt: np.ndarray, codes: np.ndarray, scale: np.ndarray, zp: np.ndarray, hessian: np.ndarray,
                  block: int, cols: int = 64) -> np.ndarray:
    """The block scales [N, k_blocks] that minimise the layer's output error for fixed codes
    and zero points: for output column n with ``d = codes - zp`` laid out per block (D, K x
    k_blocks), ``min_s (w - D s)^T H (w - D s)`` is the linear system ``D^T H D s = D^T H w``
    (k_blocks unknowns, cross-block correlations included). Blocks whose codes all sit on the
    zero point keep their scale. It cannot raise the error GPTQ minimised (the old scales are
    a candidate); MiniLM gptq cosine +0.0001, re-running GPTQ with the refit scales twice more
    +0.0003 for 3x the time (not done)."""
    n, k = wt.shape
    nb = scale.shape[1]
    kp = nb * block
    h = np.zeros((kp, kp))
    h[:k, :k] = np.asarray(hessian, dtype=np.float64).reshape(k, k)
    h4 = h.reshape(kp, nb, block)
    out = scale.astype(np.float64).copy()
    for c0 in range(0, n, cols):
        d = codes[c0:c0 + cols, :kp].astype(np.float64).reshape(-1, nb, block) - zp[c0:c0 + cols, :, None]
        m = d.shape[0]
        e = np.einsum("alb,nlb->nal", h4, d).reshape(m, nb, block, nb)
        a = np.einsum("nja,njal->njl", d, e)
        w = np.zeros((m, kp))
        w[:, :k] = wt[c0:c0 + cols]
        rhs = np.einsum("nja,nja->nj", d, (w @ h).reshape(m, nb, block))
        dead = np.einsum("njj->nj", a) <= 0
        idx = np.arange(nb)
        a[:, idx, idx] += dead + 1e-12 * np.abs(a[:, idx, idx]).max(axis=1, keepdims=True)
        rhs = np.where(dead, out[c0:c0 + cols], rhs)
        out[c0:c0 + cols] = np.linalg.solve(a, rhs[..., None])[..., 0]
    return out.astype(np.float32)


def _gptq(wt: np.ndarray, hessian: np.ndarray, scale: np.ndarray, zp: np.ndarray,
          opts: WeightOnlyOptions) -> np.ndarray:
    n, k = wt.shape
    qt = opts.qtype()
    per_col = np.repeat(scale, opts.block_size, axis=1)[:, :k]
    per_zp = np.repeat(zp, opts.block_size, axis=1)[:, :k]
    h = np.asarray(hessian, dtype=np.float64).reshape(k, k)
    # act order: the inputs with the largest second moment are rounded first, so that the
    # error they leave is spread over the most columns still free (the block qparams stay
    # those of the original blocks: each column keeps its own scale wherever it goes)
    order = np.argsort(-np.diag(h), kind="stable")
    inv = np.argsort(order)
    codes = gptq_round(wt[None, :, order], h[order][:, order][None], per_col[None, :, order],
                       per_zp[None, :, order], qt.qmin, qt.qmax)[0][:, inv]
    pad = scale.shape[1] * opts.block_size - k
    if pad:
        codes = np.concatenate([codes, np.broadcast_to(zp[:, -1:], (n, pad))], axis=1)
    return codes.astype(np.uint8)


def awq_search(weights: list[np.ndarray], hessian: np.ndarray, opts: WeightOnlyOptions) -> np.ndarray | None:
    """The activation-aware per-input-channel scale for layers sharing one input.

    Candidates s = rms(x)^alpha (rms from the diagonal of the input second moments, normalised
    to geometric mean 1) for alpha in AWQ_ALPHAS; each scaled weight diag(s) W is RTN-quantized
    and the output error sum ||X (W - diag(1/s) Q(diag(s) W))||^2 is measured through the
    moments (in their top AWQ_RANK eigen-directions, on at most AWQ_COLUMNS output columns of
    each weight). Returns the best s, or None when
    alpha = 0 (plain RTN) wins, so that no activation scaling is emitted."""
    k = hessian.shape[-1]
    h = np.asarray(hessian, dtype=np.float64).reshape(k, k)
    proj = _top_directions(h, AWQ_RANK).astype(np.float32)
    # output columns are independent: a fixed, evenly spread subset ranks the candidates
    # (1.1B decoder: the search over all columns cost more than the rest of the compile)
    weights = [w if w.shape[1] <= AWQ_COLUMNS else
               w[:, np.linspace(0, w.shape[1] - 1, AWQ_COLUMNS).round().astype(np.int64)] for w in weights]
    rms = np.sqrt(np.maximum(np.diag(h), 0.0))
    rms = np.where(rms > 0, rms, rms[rms > 0].min() if (rms > 0).any() else 1.0)
    best_err, best = None, None
    for alpha in AWQ_ALPHAS:
        s = rms**alpha
        s = (s / np.exp(np.log(s).mean())).astype(np.float32)
        err = 0.0
        for w in weights:
            ws = w * s[:, None]
            wt = np.ascontiguousarray(ws.T)
            # candidates compared with full-range blocks (the clipping search would cost
            # len(CLIP_RATIOS) times more for a ranking it rarely changes)
            scale, zp = _range_params(_extremes(_blocks(wt, opts.block_size), opts), opts, 1.0)
            codes = _rtn(wt, scale, zp, opts)
            deq = dequantize_blocks(codes, scale, zp, k, opts.block_size) / s[:, None]
            err += float(np.square(proj @ (w - deq)).sum())
        if best_err is None or err < best_err:
            best_err, best = err, (None if alpha == 0 else s)
    return best


def _top_directions(h: np.ndarray, rank: int) -> np.ndarray:
    """P [r, K] with P^T P ~ h's best rank-r approximation (h symmetric PSD), so that
    ||P d||^2 ~ d^T h d. A full eigendecomposition cost 75 of 99 s of an AWQ compile of MiniLM;
    a seeded randomized range finder with two power iterations (products with h, one QR and an
    r x r eigendecomposition) finds the same dominant directions for a fraction of that."""
    k = h.shape[0]
    if k <= rank:
        vals, vecs = np.linalg.eigh(h)
    else:
        omega = np.random.default_rng(0).standard_normal((k, rank + 8))
        basis = np.linalg.qr(h @ omega)[0]
        for _ in range(2):
            basis = np.linalg.qr(h @ basis)[0]
        vals, small = np.linalg.eigh(basis.T @ h @ basis)
        vecs = basis @ small
    top = np.argsort(vals)[::-1][:rank]
    return (vecs[:, top] * np.sqrt(np.maximum(vals[top], 0.0))).T.astype(np.float32)


def release_pages(a: np.ndarray) -> None:
    """Drop the pages of a memory-mapped weight from the process once it has been read.

    Read-only file pages stay mapped (and counted in RSS) while anything references the map:
    on the 1.1B decoder, RSS grew past 3.5 GB of file pages for 0.6 GB of anonymous memory.
    MADV_DONTNEED gives them back; a later read refetches them from the page cache, so this
    only changes memory, never values. Arrays not backed by a map are left alone."""
    import mmap

    base = a
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    m = getattr(base, "_mmap", None)
    if isinstance(m, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, low bits first, padding each row to a byte."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.copy()
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), np.uint8)], axis=-1)
    c = codes.reshape(codes.shape[:-1] + (-1, per))
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= (c[..., i] & (2**bits - 1)) << (bits * i)
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes of each row (last axis)."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :count]
    per = 8 // bits
    parts = [(packed >> (bits * i)) & (2**bits - 1) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count]


def dequantize_blocks(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray, k: int, block: int) -> np.ndarray:
    """Codes [N, >=K], scale/zp [N, k_blocks] -> float32 weight [K, N]."""
    n = codes.shape[0]
    c = codes[:, : scale.shape[1] * block].reshape(n, -1, block).astype(np.float32)
    w = (c - zp.astype(np.float32)[..., None]) * scale.astype(np.float32)[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


def matmul_nbits(a: np.ndarray, b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, k: int,
                 n: int, bits: int, block_size: int, bias: np.ndarray | None = None) -> np.ndarray:
    """numpy reference of com.microsoft.MatMulNBits (float32 weight, float32 product)."""
    nb = -(-k // block_size)
    codes = unpack_codes(np.asarray(b).reshape(n, -1), bits, nb * block_size)
    scale = np.asarray(scales, dtype=np.float32).reshape(n, nb)
    if zero_points is None:
        zp = np.full((n, nb), 2 ** (bits - 1), dtype=np.float32)
    elif np.asarray(zero_points).dtype == np.uint8:
        zp = unpack_codes(np.asarray(zero_points).reshape(n, -1), bits, nb)
    else:
        zp = np.asarray(zero_points, dtype=np.float32).reshape(n, nb)
    w = dequantize_blocks(codes, scale, zp, k, block_size)
    y = np.matmul(np.asarray(a, dtype=np.float32), w)
    return y if bias is None else y + bias


def gather_block_quantized(data: np.ndarray, indices: np.ndarray, scales: np.ndarray,
                           zero_points: np.ndarray | None, *, block_size: int, bits: int) -> np.ndarray:
    """numpy reference of com.microsoft.GatherBlockQuantized for the form lowering emits:
    uint8 data [V, D*bits/8] packed along the last axis, gather_axis 0, quantize_axis last."""
    v, d = scales.shape[0], np.asarray(data).shape[-1] * 8 // bits
    nb = scales.shape[1]
    codes = unpack_codes(data, bits, d)
    zp = (np.full((v, nb), 2 ** (bits - 1), np.float32) if zero_points is None
          else unpack_codes(zero_points, bits, nb).astype(np.float32))
    deq = (codes.astype(np.float32).reshape(v, nb, -1) - zp[..., None]) * scales.astype(np.float32)[..., None]
    table = deq.reshape(v, -1)[:, :d]
    return table[np.asarray(indices, dtype=np.int64)]
