"""quantize-weights: weight-only quantization, lowered the way the target's [weight_only] says."""

from __future__ import annotations

import time
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from qcompiler import Model, Node, Pass, PassContext, PassResult, UserError, Value, is_constant, producer, users
from qcompiler.calibration import input_moments
from qcompiler.weight_only import (WEIGHT_ONLY_KERNELS, BlockQuantized, WeightOnlyOptions, awq_search, block_quantize,
                                   pack_codes, release_pages)


__all__ = ["QuantizeWeights"]

_MS = "com.microsoft"


def _weight_matmuls(model: Model, block: int) -> list[Node]:
    """Main-graph MatMuls whose B is a constant 2-D float weight with K >= block_size."""
    out = []
    for node in model.graph.nodes:
        if node.op != "MatMul" or len(node.inputs) != 2 or is_constant(node.inputs[0]):
            continue
        w = node.inputs[1]
        if is_constant(w) and w.shape is not None and len(w.shape) == 2 and w.shape[0] >= block \
                and np.dtype(w.dtype) == np.float32:
            out.append(node)
    return out


def _embedding_gathers(model: Model, block: int) -> list[Node]:
    out = []
    for node in model.graph.nodes:
        if node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0 or not is_constant(node.inputs[0]):
            continue
        t = node.inputs[0]
        if t.shape is not None and len(t.shape) == 2 and t.shape[1] % block == 0 and np.dtype(t.dtype) == np.float32:
            out.append(node)
    return out


@dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Store every MatMul's constant float weight [K, N] (and, where the target names a gather
    kernel, every embedding table read by Gather) as `bits`-bit codes in blocks of
    `block-size` along K, with activations left in float.

    Lowering (the target's `[weight_only]` table): `com.microsoft.MatMulNBits` replaces the
    MatMul (packed codes, scales, zero points, `accuracy_level` from the target); or a blocked
    `DequantizeLinear` (opset 21, run `upgrade-opset{min-version=21}` first) feeds the float
    MatMul. `algorithm`: `rtn` (no data), `gptq` (input second moments from calibration data,
    quant.gptq_round) or `awq` (per-input-channel scale search, see qcompiler.weight_only;
    the scale is folded into a preceding constant Mul / LayerNormalization when every reader
    of the activation shares it, else a Mul on the activation is inserted); empty: `gptq`
    with calibration data, `rtn` without. `moment-samples`: calibration samples whose input
    second moments gptq/awq read (MiniLM int4: 16 -> 64 samples raised gptq's cosine from
    0.9847 to 0.9886). `symmetric` unset: the target's first listed choice. Weights are read and replaced one at a time, so a
    memory-mapped input never has two float copies of a weight in memory. Edits in place.
    """

    name = "quantize-weights"
    bits: int = 4
    block_size: int = 32
    symmetric: bool | None = None  # None: the first value the target's weight_only.symmetric lists
    algorithm: str = ""
    gather: bool = True
    moment_samples: int = 256

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rule = ctx.target.weight_only
        if rule is None:
            raise UserError(f"target '{ctx.target.name}' has no [weight_only] table: it cannot run weight-only models")
        symmetric = rule.symmetric[0] if self.symmetric is None else self.symmetric
        opts = WeightOnlyOptions(self.bits, self.block_size, symmetric, self.algorithm).validate(
            has_data=ctx.calibration is not None)
        for key, value, allowed in (("bits", opts.bits, rule.bits), ("block_sizes", opts.block_size, rule.block_sizes),
                                    ("symmetric", opts.symmetric, rule.symmetric)):
            if value not in allowed:
                shown = str(value).lower() if isinstance(value, bool) else value
                raise UserError(f"target '{ctx.target.name}': key 'weight_only.{key}' does not allow {shown}")
        algorithm = opts.algorithm or ("gptq" if ctx.calibration is not None else "rtn")
        start = time.perf_counter()
        rw = ctx.rewriter(model)
        graph = model.graph
        nodes = _weight_matmuls(model, opts.block_size)
        moments = {}
        if algorithm != "rtn" and nodes:
            moments = input_moments(model, ctx.calibration, {n.name for n in nodes}, samples=self.moment_samples)
        scaled = self._apply_awq(model, rw, nodes, moments, opts) if algorithm == "awq" else 0
        qdq = rule.kernel == "DequantizeLinear"
        if qdq and (model.opset("") or 0) < 21:
            raise UserError(f"pass 'quantize-weights': blocked DequantizeLinear needs opset 21 (model has "
                            f"{model.opset('')}); run upgrade-opset{{min-version=21}} first")
        lowered = 0
        for node in nodes:
            w = node.inputs[1]
            hessian = moments.get(node.name) if algorithm == "gptq" else None
            values = w.values
            q = block_quantize(values, opts, "gptq" if hessian is not None else "rtn", hessian)
            release_pages(values)
            if qdq:
                self._lower_dq(rw, graph, node, q)
            else:
                self._lower_nbits(rw, graph, node, q, rule.accuracy_level, rule.kernel)
            lowered += 1
        gathers = 0
        if self.gather and rule.gather_kernel:
            for node in _embedding_gathers(model, opts.block_size):
                self._lower_gather(rw, graph, node, opts, rule.gather_kernel)
                gathers += 1
        rw.cleanup(graph)
        ctx.analysis.setdefault("lowered", []).extend(
            [rule.kernel.split(".")[-1]] * lowered + [rule.gather_kernel.split(".")[-1]] * gathers)
        ctx.report["weight_only"] = {"bits": opts.bits, "block_size": opts.block_size, "symmetric": opts.symmetric,
                                     "algorithm": algorithm, "kernel": rule.kernel, "matmuls": lowered,
                                     "gathers": gathers, "awq_scaled": scaled,
                                     "seconds": round(time.perf_counter() - start, 3)}
        return PassResult(lowered + gathers > 0)

    # -- AWQ: one scale per activation, searched over every layer reading it ------------------
    def _apply_awq(self, model: Model, rw, nodes: list[Node], moments: dict, opts: WeightOnlyOptions) -> int:
        groups: dict[str, list[Node]] = {}
        for node in nodes:
            if node.name in moments:
                groups.setdefault(node.inputs[0].name, []).append(node)
        scaled = 0
        for members in groups.values():
            x = members[0].inputs[0]
            s = awq_search([np.asarray(n.inputs[1].values, dtype=np.float32) for n in members],
                           moments[members[0].name], opts)
            if s is None:
                continue
            for n in members:  # W' = diag(s) W: the layer then reads x / s
                rw.set_input(n, 1, rw.constant(n.inputs[1].name + "_awq", n.inputs[1].values * s[:, None]))
            inv = (1.0 / s).astype(np.float32)
            if not self._fold(rw, x, members, inv):
                y = rw.value(x.name + "_awq", dtype=x.dtype, shape=x.shape)
                rw.create_node(model.graph, "Mul", [x, rw.constant(x.name + "_awq_inv", inv)], [y],
                               name=x.name + "_awq", before=members[0])
                for n in members:
                    rw.set_input(n, 0, y)
            scaled += 1
        return scaled

    @staticmethod
    def _fold(rw, x: Value, members: list[Node], inv: np.ndarray) -> bool:
        """Divide the activation by s inside its producer when that is exact: a Mul by a
        constant [K] vector (RMSNorm's gamma) or a LayerNormalization (scale and bias), read
        only by the layers sharing s."""
        prod = producer(x)
        if prod is None or {id(c) for c in users(x)} != {id(n) for n in members}:
            return False
        k = inv.shape[0]
        if prod.op == "LayerNormalization" and int(prod.attrs.get("axis", -1)) == -1:
            idx = [i for i in (1, 2) if i < len(prod.inputs) and is_constant(prod.inputs[i])]
            if len(idx) != len([i for i in (1, 2) if i < len(prod.inputs) and prod.inputs[i].name]):
                return False
            for i in idx:
                c = prod.inputs[i]
                rw.set_input(prod, i, rw.constant(c.name + "_awq", (np.asarray(c.values) * inv).astype(np.float32)))
            return True
        if prod.op == "Mul":
            for i in (0, 1):
                c = prod.inputs[i]
                if is_constant(c) and c.shape is not None and tuple(c.shape) == (k,):
                    rw.set_input(prod, i, rw.constant(c.name + "_awq", (np.asarray(c.values) * inv).astype(np.float32)))
                    return True
        return False

    # -- lowerings ------------------------------------------------------------------------------
    @staticmethod
    def _lower_nbits(rw, graph, node: Node, q: BlockQuantized, accuracy_level: int, kernel: str) -> None:
        """``kernel``: the target's name for it (domain.op); its layout is the kernel table's."""
        domain, op = kernel.rsplit(".", 1)
        facts = WEIGHT_ONLY_KERNELS[op]
        n = q.codes.shape[0]
        base = node.inputs[1].name
        inputs = [node.inputs[0], rw.constant(base + "_q4" if q.bits == 4 else base + "_q8", q.packed()),
                  rw.constant(base + "_scales", q.scale.reshape(-1))]
        zp = q.packed_zero_points()
        if zp is not None:
            inputs.append(rw.constant(base + "_zp", zp))
        attrs = {"K": q.k, "N": n, "bits": q.bits, "block_size": q.block_size, "accuracy_level": accuracy_level}
        outputs = list(node.outputs)
        rw.create_node(graph, op, inputs, outputs, attrs, name=node.name, domain=facts.domain, before=node)
        rw.erase_node(graph, node)

    @staticmethod
    def _lower_dq(rw, graph, node: Node, q: BlockQuantized) -> None:
        """codes -> int4/uint4 (int8/uint8) [K, N], DequantizeLinear(axis 0, block_size) -> MatMul."""
        k = q.k
        half = 2 ** (q.bits - 1)
        codes = q.codes[:, :k].T  # [K, N]
        if q.symmetric:
            dt = ml_dtypes.int4 if q.bits == 4 else np.int8
            stored = (codes.astype(np.int16) - half).astype(dt)
            zp = None
        else:
            dt = ml_dtypes.uint4 if q.bits == 4 else np.uint8
            stored = codes.astype(dt)
            zp = np.ascontiguousarray(q.zero_point.T).astype(dt)
        base = node.inputs[1].name
        dq_in = [rw.constant(base + "_quantized", np.ascontiguousarray(stored)),
                 rw.constant(base + "_scale", np.ascontiguousarray(q.scale.T))]
        if zp is not None:
            dq_in.append(rw.constant(base + "_zero_point", zp))
        w = rw.value(base + "_dequantized", dtype=np.float32, shape=[k, codes.shape[1]])
        rw.create_node(graph, "DequantizeLinear", dq_in, [w], {"axis": 0, "block_size": q.block_size},
                       name=base + "_DequantizeLinear", before=node)
        rw.set_input(node, 1, w)

    @staticmethod
    def _lower_gather(rw, graph, node: Node, opts: WeightOnlyOptions, kernel: str) -> None:
        domain, op = kernel.rsplit(".", 1)
        facts = WEIGHT_ONLY_KERNELS[op]
        table = node.inputs[0]
        values = table.values
        q = block_quantize(np.asarray(values, dtype=np.float32).T, opts)  # blocks along the row
        release_pages(values)
        d = q.k
        inputs = [rw.constant(table.name + "_quantized", pack_codes(q.codes[:, :d], opts.bits)), node.inputs[1],
                  rw.constant(table.name + "_scales", q.scale)]
        zp = q.packed_zero_points()
        if zp is not None:
            inputs.append(rw.constant(table.name + "_zp", pack_codes(q.zero_point, opts.bits)))
        attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": opts.block_size, "bits": opts.bits}
        rw.create_node(graph, op, inputs, list(node.outputs), attrs, name=node.name, domain=facts.domain,
                       before=node)
        rw.erase_node(graph, node)
