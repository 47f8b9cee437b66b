"""Generate a Llama-style decoder ONNX model (for weight-only scale and speed benchmarks).

RMSNorm, rotary position embedding, grouped-query attention with the KV cache as inputs
(`past_key_i`, `past_value_i` [1, kv_heads, past, head_dim]) and outputs (`present_*`), a
SwiGLU MLP and a tied-size LM head; inputs `input_ids` int64 [1, seq]. The weights are
seeded and heavy-tailed (Student t, 4 degrees of freedom) and a few hidden channels carry
large RMSNorm gains, so that every projection sees a few outlier input channels, as real
LLM activations do. Weights are written tensor by tensor into one external-data file: the
generator never holds the model in memory (a 1.1B model is ~4.4 GB on disk).

    python benchmarks/make_decoder.py --size 1.1b --out /tmp/dec/decoder.onnx
    python benchmarks/make_decoder.py --size tiny --out /tmp/dec/tiny.onnx

Generated weights are not a trained model: fidelity figures on it say how well the
quantized model reproduces this model's next-token logits, nothing about language quality.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["DecoderConfig", "SIZES", "build_decoder", "decode_feed", "prefill_feed"]


@dataclass(frozen=True)
class DecoderConfig:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    outlier_channels: int = 4
    outlier_gain: float = 12.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> int:
        hd = self.head_dim
        per = self.hidden * (self.heads * hd) * 2 + self.hidden * (self.kv_heads * hd) * 2 \
            + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * per + 2 * self.vocab * self.hidden + self.hidden


SIZES = {
    "tiny": DecoderConfig(64, 160, 2, 4, 2, 256),
    "small": DecoderConfig(256, 704, 4, 8, 2, 4096),
    "75m": DecoderConfig(768, 2048, 8, 12, 4, 16000),
    "250m": DecoderConfig(1024, 2816, 16, 16, 4, 32000),
    "1.1b": DecoderConfig(2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B's shape
}


class _Writer:
    """Initializers written straight into one external-data file (offsets 64-byte aligned)."""

    def __init__(self, model_path: Path, seed: int) -> None:
        self.location = model_path.name + ".data"
        self.fh = open(model_path.parent / self.location, "wb")
        self.seed = seed
        self.count = 0
        self.inits: list[TensorProto] = []

    def add(self, name: str, arr: np.ndarray, inline: bool = False) -> str:
        arr = np.ascontiguousarray(arr)
        if inline or arr.nbytes < 1024:
            self.inits.append(onnx.numpy_helper.from_array(arr, name))
            return name
        pos = self.fh.tell()
        pad = (-pos) % 64
        self.fh.write(b"\0" * pad)
        offset = pos + pad
        self.fh.write(arr.tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape,
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(arr.nbytes))):
            t.external_data.add(key=k, value=v)
        self.inits.append(t)
        return name

    def weight(self, name: str, k: int, n: int, std: float) -> str:
        rng = np.random.default_rng([self.seed, self.count])
        self.count += 1
        w = rng.standard_t(4.0, size=(k, n)).astype(np.float32) * np.float32(std / math.sqrt(2.0))
        return self.add(name, w)


def build_decoder(cfg: DecoderConfig, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the decoder to ``path`` (+ ``path.data``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wr = _Writer(path, seed)
    nodes: list[onnx.NodeProto] = []
    hd, h = cfg.head_dim, cfg.hidden

    def node(op: str, ins: list[str], out: str, **attrs) -> str:  # noqa: ANN003
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def const(name: str, arr: np.ndarray) -> str:
        return wr.add(name, np.asarray(arr), inline=True)

    rng = np.random.default_rng([seed, 10**6])
    outliers = rng.choice(h, cfg.outlier_channels, replace=False)

    def gains(name: str) -> str:
        g = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        g[outliers] *= cfg.outlier_gain
        return wr.add(name, g, inline=True)

    def rmsnorm(x: str, prefix: str) -> str:
        sq = node("Mul", [x, x], f"{prefix}/sq")
        ms = node("ReduceMean", [sq], f"{prefix}/ms", axes=[-1], keepdims=1)
        rs = node("Sqrt", [node("Add", [ms, const(f"{prefix}/eps", np.float32(1e-5))], f"{prefix}/mse")], f"{prefix}/rms")
        normed = node("Div", [x, rs], f"{prefix}/normed")
        return node("Mul", [normed, gains(f"{prefix}/weight")], f"{prefix}/out")

    one, zero = const("one_i64", np.array([1], np.int64)), const("zero_i64", np.array([0], np.int64))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", cfg.vocab])]
    embed = wr.weight("embed_tokens", cfg.vocab, h, 0.02)
    x = node("Gather", [embed, "input_ids"], "embed/out", axis=0)
    # positions past..past+seq, causal mask [seq, total], rotary tables [seq, hd/2]
    past_len = node("Gather", [node("Shape", ["past_key_0"], "past_shape"), const("i2", np.array(2, np.int64))],
                    "past_len")
    seq_len = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), const("i1", np.array(1, np.int64))], "seq_len")
    total = node("Add", [past_len, seq_len], "total_len")
    pos = node("Range", [past_len, total, const("step", np.array(1, np.int64))], "positions")
    cols = node("Range", [const("start0", np.array(0, np.int64)), total, "step"], "key_positions")
    allowed = node("LessOrEqual", [node("Unsqueeze", [cols, zero], "cols2d"), node("Unsqueeze", [pos, one], "rows2d")],
                   "causal")
    mask = node("Where", [allowed, const("f0", np.float32(0)), const("fneg", np.float32(-1e9))], "mask")
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))).astype(np.float32)
    freqs = node("Mul", [node("Unsqueeze", [node("Cast", [pos], "pos_f", to=TensorProto.FLOAT), one], "pos_col"),
                         const("inv_freq", inv_freq)], "freqs")
    cos, sin = node("Cos", [freqs], "rope_cos"), node("Sin", [freqs], "rope_sin")
    half = const("half", np.array([hd // 2], np.int64))
    end = const("end", np.array([hd], np.int64))
    last = const("last_axis", np.array([-1], np.int64))

    def rope(t: str, prefix: str) -> str:
        a = node("Slice", [t, zero, half, last], f"{prefix}/x1")
        b = node("Slice", [t, half, end, last], f"{prefix}/x2")
        r1 = node("Sub", [node("Mul", [a, cos], f"{prefix}/ac"), node("Mul", [b, sin], f"{prefix}/bs")], f"{prefix}/r1")
        r2 = node("Add", [node("Mul", [b, cos], f"{prefix}/bc"), node("Mul", [a, sin], f"{prefix}/as")], f"{prefix}/r2")
        return node("Concat", [r1, r2], f"{prefix}/out", axis=-1)

    groups = cfg.heads // cfg.kv_heads
    for i in range(cfg.layers):
        p = f"layers.{i}"
        inputs += [helper.make_tensor_value_info(f"past_{kv}_{i}", TensorProto.FLOAT, [1, cfg.kv_heads, "past", hd])
                   for kv in ("key", "value")]
        outputs += [helper.make_tensor_value_info(f"present_{kv}_{i}", TensorProto.FLOAT, [1, cfg.kv_heads, "total", hd])
                    for kv in ("key", "value")]
        xn = rmsnorm(x, f"{p}/input_norm")
        std = 1.0 / math.sqrt(h * cfg.outlier_gain)

        def heads(t: str, n: int, name: str) -> str:
            r = node("Reshape", [t, const(f"{name}/shape", np.array([1, -1, n, hd], np.int64))], f"{name}/r")
            return node("Transpose", [r], f"{name}/t", perm=[0, 2, 1, 3])

        q = heads(node("MatMul", [xn, wr.weight(f"{p}/q_proj", h, cfg.heads * hd, std)], f"{p}/q_proj/out"),
                  cfg.heads, f"{p}/q")
        k = heads(node("MatMul", [xn, wr.weight(f"{p}/k_proj", h, cfg.kv_heads * hd, std)], f"{p}/k_proj/out"),
                  cfg.kv_heads, f"{p}/k")
        v = heads(node("MatMul", [xn, wr.weight(f"{p}/v_proj", h, cfg.kv_heads * hd, std)], f"{p}/v_proj/out"),
                  cfg.kv_heads, f"{p}/v")
        q, k = rope(q, f"{p}/q_rope"), rope(k, f"{p}/k_rope")
        k_all = node("Concat", [f"past_key_{i}", k], f"present_key_{i}", axis=2)
        v_all = node("Concat", [f"past_value_{i}", v], f"present_value_{i}", axis=2)

        def repeat(t: str, name: str) -> str:
            u = node("Unsqueeze", [t, const(f"{name}/ax", np.array([2], np.int64))], f"{name}/u")
            e = node("Expand", [u, const(f"{name}/rep", np.array([1, 1, groups, 1, 1], np.int64))], f"{name}/e")
            return node("Reshape", [e, const(f"{name}/shape", np.array([1, cfg.heads, -1, hd], np.int64))], f"{name}/r")

        kt = node("Transpose", [repeat(k_all, f"{p}/k_rep")], f"{p}/kt", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, kt], f"{p}/qk"), const(f"{p}/scale", np.float32(1 / math.sqrt(hd)))],
                      f"{p}/scores")
        probs = node("Softmax", [node("Add", [scores, mask], f"{p}/masked")], f"{p}/probs", axis=-1)
        ctxv = node("MatMul", [probs, repeat(v_all, f"{p}/v_rep")], f"{p}/ctx")
        merged = node("Reshape", [node("Transpose", [ctxv], f"{p}/ctx_t", perm=[0, 2, 1, 3]),
                                  const(f"{p}/merge", np.array([1, -1, cfg.heads * hd], np.int64))], f"{p}/merged")
        attn = node("MatMul", [merged, wr.weight(f"{p}/o_proj", cfg.heads * hd, h, 1.0 / math.sqrt(h))], f"{p}/o_proj/out")
        x = node("Add", [x, attn], f"{p}/resid1")
        xn = rmsnorm(x, f"{p}/post_norm")
        gate = node("MatMul", [xn, wr.weight(f"{p}/gate_proj", h, cfg.intermediate, std)], f"{p}/gate_proj/out")
        up = node("MatMul", [xn, wr.weight(f"{p}/up_proj", h, cfg.intermediate, std)], f"{p}/up_proj/out")
        act = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/sig")], f"{p}/silu")
        down = node("MatMul", [node("Mul", [act, up], f"{p}/swiglu"),
                               wr.weight(f"{p}/down_proj", cfg.intermediate, h, 1.0 / math.sqrt(cfg.intermediate))],
                    f"{p}/down_proj/out")
        x = node("Add", [x, down], f"{p}/resid2")
    xn = rmsnorm(x, "final_norm")
    node("MatMul", [xn, wr.weight("lm_head", h, cfg.vocab, 1.0 / math.sqrt(h * cfg.outlier_gain))], "logits")
    wr.fh.close()
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, wr.inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="qcompiler-make-decoder")
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString(deterministic=True))
    return path


def prefill_feed(cfg: DecoderConfig, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids, empty cache."""
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(0, cfg.vocab, size=(1, seq), dtype=np.int64)}
    for i in range(cfg.layers):
        for kv in ("key", "value"):
            feed[f"past_{kv}_{i}"] = np.zeros((1, cfg.kv_heads, 0, cfg.head_dim), np.float32)
    return feed


def decode_feed(cfg: DecoderConfig, past: int, seed: int) -> dict[str, np.ndarray]:
    """One token with a ``past``-token cache of random keys and values."""
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(0, cfg.vocab, size=(1, 1), dtype=np.int64)}
    for i in range(cfg.layers):
        for kv in ("key", "value"):
            feed[f"past_{kv}_{i}"] = rng.standard_normal((1, cfg.kv_heads, past, cfg.head_dim)).astype(np.float32)
    return feed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--out", required=True, help="model path (not inside the repository)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = SIZES[a.size]
    out = build_decoder(cfg, a.out, a.seed)
    print(f"{out}: {cfg.params() / 1e6:.1f}M parameters, {os.path.getsize(str(out) + '.data') / 1e9:.2f} GB data")


if __name__ == "__main__":
    main()
