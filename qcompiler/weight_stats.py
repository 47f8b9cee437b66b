"""Layer-streamed input statistics for weight-only rounding (GPTQ, AWQ) on models of any size.

Running the whole float model in one onnxruntime session holds every weight (and onnxruntime's
prepacked copies) at once, and keeping every MatMul input's second moments until the run ends
holds all of them too: ~4.5 GB + ~7.7 GB (float64) on the 1.1B decoder. Here the main graph is
cut, in topological order, into *segments* holding at most ``segment_bytes`` of weights (about
one decoder layer). Each segment runs as its own small session over every sample: its large
weights are fed as inputs straight from the IR's (memory-mapped) arrays, so onnxruntime neither
copies nor prepacks them; the activations crossing segment boundaries are kept per sample (a
hidden state: kilobytes to megabytes) and dropped once no later segment reads them. The second
moments of the MatMul inputs a segment observes are handed to ``on_moments`` as soon as that
segment is done, so a caller that reduces them (AWQ keeps one scale vector) never holds more
than one segment's moments. Peak memory: one segment's weights and moments plus the kept
activations, whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from .ir import Model

__all__ = ["stream_input_moments", "SEGMENT_BYTES"]

SEGMENT_BYTES = 256 << 20  # weights per segment (one 1.1B-decoder layer is 176 MB of float32)
_MIN_FED = 1024  # initializers at least this large are fed from the IR's arrays, smaller stay inline


@dataclass
class _Segment:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    weight_bytes: int = 0
    reads: set[str] = field(default_factory=set)  # every name its nodes (and their bodies) read
    writes: set[str] = field(default_factory=set)


def _body_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (their own values excluded)."""
    out: set[str] = set()
    for attr in node.attribute:
        bodies = [attr.g] if attr.HasField("g") else list(attr.graphs)
        for g in bodies:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            local |= {o for n in g.node for o in n.output}
            for n in g.node:
                out |= {i for i in n.input if i and i not in local}
                out |= {i for i in _body_reads(n) if i not in local}
    return out


def _segments(graph: onnx.GraphProto, sizes: Mapping[str, int], budget: int) -> list[_Segment]:
    segs = [_Segment()]
    for node in graph.node:
        reads = {i for i in node.input if i} | _body_reads(node)
        new = sum(sizes.get(n, 0) for n in reads if n not in segs[-1].reads)
        if segs[-1].nodes and segs[-1].weight_bytes + new > budget:
            segs.append(_Segment())
            new = sum(sizes.get(n, 0) for n in reads)
        seg = segs[-1]
        seg.nodes.append(node)
        seg.weight_bytes += new
        seg.reads |= reads
        seg.writes |= {o for o in node.output if o}
    return segs


def stream_input_moments(model: Model, data: Iterable[Mapping[str, np.ndarray]], observe: Iterable[str],
                         on_moments: Callable[[str, np.ndarray], None], *, samples: int,
                         segment_bytes: int | None = None, release: Callable[[np.ndarray], None] | None = None,
                         threads: int = 0) -> int:
    """Run the float model segment by segment over the first ``samples`` feeds of ``data`` and
    call ``on_moments(name, H)`` with ``H = sum x x^T`` ([K, K] float64, x the rows of the
    value's last axis) for every value in ``observe``, once the segment that produces (or
    first reads) it has run; segments hold at most ``segment_bytes`` of weights (default
    SEGMENT_BYTES). ``release`` is called on each fed weight after its last segment
    (e.g. to drop memory-mapped pages). Returns the number of segments."""
    import onnxruntime as ort

    feeds = [dict(f) for _, f in zip(range(samples), data)]
    if not feeds:
        return 0
    arrays: dict[str, np.ndarray] = {}
    proto = model.to_proto(shared=arrays, min_bytes=_MIN_FED)
    sizes = {name: int(a.nbytes) for name, a in arrays.items()}
    graph = proto.graph
    inline = {t.name: t for t in graph.initializer if t.name not in arrays}
    segs = _segments(graph, sizes, SEGMENT_BYTES if segment_bytes is None else segment_bytes)
    wanted = set(observe)
    last_read: dict[str, int] = {}
    for i, seg in enumerate(segs):
        for name in seg.reads:
            last_read[name] = i
    acts: list[dict[str, np.ndarray]] = [dict(f) for f in feeds]
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    for i, seg in enumerate(segs):
        produced = seg.writes
        inputs = sorted(n for n in seg.reads if n not in produced and n not in inline)
        fed = [n for n in inputs if n in arrays]
        later = {n for n in produced if last_read.get(n, -1) > i}
        seen = sorted((wanted & (produced | set(inputs))) - set(fed))
        outputs = sorted(later | (set(seen) & produced))
        if not outputs and not seen:
            continue
        sub = onnx.helper.make_graph(
            list(seg.nodes), f"segment{i}",
            [onnx.helper.make_tensor_value_info(
                n, onnx.helper.np_dtype_to_tensor_dtype((arrays[n] if n in arrays else acts[0][n]).dtype), None)
             for n in inputs],
            [onnx.ValueInfoProto(name=n) for n in outputs],
            initializer=[inline[n] for n in sorted(seg.reads & set(inline))])
        sub_model = onnx.helper.make_model(sub, opset_imports=list(proto.opset_import))
        sub_model.ir_version = proto.ir_version
        sess = ort.InferenceSession(sub_model.SerializeToString(), so, providers=["CPUExecutionProvider"]) \
            if outputs else None
        moments: dict[str, np.ndarray] = {}
        for a in acts:
            if sess is not None:
                feed = {n: a[n] for n in inputs if n not in arrays}
                feed.update({n: arrays[n] for n in fed})
                a.update(zip(outputs, sess.run(outputs, feed)))
            for name in seen:
                x = np.asarray(a[name])
                rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
                if name in moments:
                    moments[name] += rows.T @ rows
                else:
                    moments[name] = rows.T @ rows
        del sess
        for a in acts:  # activations no later segment reads
            for n in [n for n in a if last_read.get(n, -1) <= i]:
                del a[n]
        if release is not None:
            for n in fed:
                if last_read.get(n) == i:
                    release(arrays[n])
        for name in seen:
            on_moments(name, moments.pop(name))
        wanted -= set(seen)
    return len(segs)
