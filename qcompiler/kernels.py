"""The kernel table: what each integer kernel a target may name is, in one place.

A target says *which* kernel runs an op (``[ops.Conv] kernel = "QLinearConv"``); this table
says *what* that kernel is: the float op it replaces, where its integer operands, their scales
and zero points sit among its inputs, where its output's qparams go, which attributes it
carries over from the float op, whether it takes a variable number of inputs, quantizes its
activations itself at run time (dynamic) or may give a float output. Lowering
(``lower-qoperator``), the legality checker (``qcompiler.check``), the simulator
(``qcompiler.sim``) and ``INTEGER_OPS`` all read it; none keeps a table of its own. (The idea
is PyTorch's backend pattern config: one object read by both prepare and convert.)

Adding a kernel is one entry: append a :class:`KernelSpec` to ``_SPECS`` below (or move its
name out of ``OPAQUE_KERNELS``), e.g.::

    KernelSpec("QLinearFoo", "Foo", ("com.microsoft",), (Operand(0, 1, 2),), output=(3, 4),
               attrs=("alpha",), sim="lookup-table")

``inputs`` lists, per input position of the *float* op, where that operand goes in the kernel
(:class:`Operand`: integer tensor, scale, zero point; ``None`` for an input the kernel does
not take). A kernel name unknown to the simulator (``sim=None``) is lowered and checked but not
simulated. Then name it in a target's ``[ops.Foo] kernel``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["KernelSpec", "Operand", "KERNELS", "OPAQUE_KERNELS", "INTEGER_OPS", "kernel_spec", "assemble_inputs",
           "kernels_for"]

T = TypeVar("T")


@dataclass(frozen=True)
class Operand:
    """Where one input of the float op goes in the kernel: the kernel input index of its
    integer tensor, of its scale and of its zero point (``None``: the kernel has no such
    input, e.g. an int32 bias at the accumulator's scale, or a dynamic kernel's activation
    scale that it computes itself)."""

    value: int
    scale: int | None = None
    zero_point: int | None = None

    @property
    def is_bias(self) -> bool:
        """An int32 bias: an integer tensor without qparams of its own (optional)."""
        return self.scale is None and self.zero_point is None


@dataclass(frozen=True)
class KernelSpec:
    """One integer kernel (see the module docstring).

    ``domains``: the op domains it is registered in ("" is the ONNX standard domain).
    ``inputs``: per float-op input position, an :class:`Operand` or ``None``.
    ``output``: kernel input indices of the output's scale and zero point; ``None`` when the
    output is not quantized by the kernel (int32 accumulators, float results).
    ``attrs``: the float op's attributes carried over (``None``: all of them); ``set_attrs``:
    attributes the kernel always gets. ``variadic_from``: every float-op input is an
    (integer, scale, zero point) triple at this kernel index and after (Concat).
    ``weight``: the float-op position of the weight, the only operand allowed per-channel
    scales. ``shared_zero_point``: float-op positions whose all-zero per-channel zero point
    the lowering replaces by one scalar; ``scalar_zero_point``: positions whose zero point
    must be a scalar (checked). ``dynamic``: activations are quantized at run time (no
    calibrated scale). ``float_output``: the kernel may leave out the output qparams and
    return float. ``lower``: lower-qoperator may build it from a DQ -> op -> Q group.
    ``sim``: the simulator's implementation of it (a key of ``qcompiler.sim.kernels``).
    """

    name: str
    float_op: str
    domains: tuple[str, ...]
    inputs: tuple[Operand | None, ...] = ()
    output: tuple[int, int] | None = None
    attrs: tuple[str, ...] | None = ()
    set_attrs: tuple[tuple[str, Any], ...] = ()
    variadic_from: int | None = None
    weight: int | None = None
    shared_zero_point: tuple[int, ...] = ()
    scalar_zero_point: tuple[int, ...] = ()
    dynamic: bool = False
    float_output: bool = False
    lower: bool = True
    sim: str | None = None

    @property
    def data_inputs(self) -> int | None:
        """How many leading float-op inputs carry quantized data (all of them when variadic)."""
        if self.variadic_from is not None:
            return None
        return sum(1 for o in self.inputs if o is not None and not o.is_bias)

    def carried_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """The kernel's attributes given the float op's."""
        if self.attrs is None:
            out = dict(attrs)
        else:
            out = {k: attrs[k] for k in self.attrs if k in attrs}
        out.update(self.set_attrs)
        return out

    def operand(self, position: int) -> Operand | None:
        """Where float-op input ``position`` goes in the kernel (None: not an integer operand)."""
        if self.variadic_from is not None:
            t = self.variadic_from + 3 * position
            return Operand(t, t + 1, t + 2)
        return self.inputs[position] if position < len(self.inputs) else None

    def positions(self, n_inputs: int) -> list[tuple[int, Operand]]:
        """(float-op position, operand) of every operand of a kernel node with ``n_inputs`` inputs."""
        if self.variadic_from is None:
            return [(i, o) for i, o in enumerate(self.inputs) if o is not None]
        return [(i, self.operand(i)) for i in range(len(range(self.variadic_from, n_inputs, 3)))]  # type: ignore


def assemble_inputs(spec: KernelSpec, operands: Sequence[tuple[T | None, ...] | None], out: tuple[T, T] | None,
                    empty: Callable[[], T]) -> list[T]:
    """The kernel's input list: ``operands`` per float-op position ((integer, scale, zero
    point), or (integer,) for a bias; ``None`` when absent), ``out`` the output's (scale,
    zero point) or ``None`` for a float output. Optional inputs left out before the output
    qparams become ``empty()``; trailing ones are dropped."""
    slots: dict[int, T] = {}
    for i, op in enumerate(operands):
        where = spec.operand(i)
        if op is None or where is None:
            continue
        for index, value in zip((where.value, where.scale, where.zero_point), op):
            if index is not None and value is not None:
                slots[index] = value
    if spec.output is not None and out is not None:
        slots[spec.output[0]], slots[spec.output[1]] = out
        length = max(spec.output) + 1
    else:
        length = min(spec.output) if spec.output is not None else 0
    while length in slots:
        length += 1
    length = max(length, max(slots, default=-1) + 1)
    return [slots[i] if i in slots else empty() for i in range(length)]


_UNARY = (Operand(0, 1, 2),)
_BINARY = (Operand(0, 1, 2), Operand(3, 4, 5))
_POOL = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")
_MS = ("com.microsoft",)

_SPECS = (
    KernelSpec("QLinearConv", "Conv", ("", "com.microsoft"), (Operand(0, 1, 2), Operand(3, 4, 5), Operand(8)),
               output=(6, 7), attrs=None, weight=1, shared_zero_point=(1,), sim="conv"),
    KernelSpec("QLinearMatMul", "MatMul", ("",), _BINARY, output=(6, 7), weight=1, sim="matmul"),
    KernelSpec("QGemm", "Gemm", _MS, (Operand(0, 1, 2), Operand(3, 4, 5), Operand(6)), output=(7, 8),
               attrs=("alpha", "transA", "transB"), weight=1, float_output=True, sim="gemm"),
    KernelSpec("QLinearAdd", "Add", _MS, _BINARY, output=(6, 7), sim="add"),
    KernelSpec("QLinearMul", "Mul", _MS, _BINARY, output=(6, 7), sim="mul"),
    KernelSpec("QLinearGlobalAveragePool", "GlobalAveragePool", _MS, _UNARY, output=(3, 4),
               set_attrs=(("channels_last", 0),), sim="global-average-pool"),
    KernelSpec("QLinearAveragePool", "AveragePool", _MS, _UNARY, output=(3, 4), attrs=_POOL,
               set_attrs=(("channels_last", 0),), sim="average-pool"),
    KernelSpec("QLinearSigmoid", "Sigmoid", _MS, _UNARY, output=(3, 4), sim="sigmoid"),
    KernelSpec("QLinearLeakyRelu", "LeakyRelu", _MS, _UNARY, output=(3, 4), attrs=("alpha",), sim="leaky-relu"),
    # takes the model's opset as an attribute: checked, not built by lower-qoperator yet
    KernelSpec("QLinearSoftmax", "Softmax", _MS, _UNARY, output=(3, 4), attrs=("axis",), lower=False),
    KernelSpec("QLinearConcat", "Concat", _MS, output=(0, 1), attrs=("axis",), variadic_from=2, sim="concat"),
    # onnxruntime's CPU ConvInteger takes a scalar w_zero_point only (REFERENCE C.1)
    KernelSpec("ConvInteger", "Conv", ("",), (Operand(0, None, 2), Operand(1, None, 3)), attrs=None, weight=1,
               scalar_zero_point=(1,), dynamic=True, sim="conv-integer"),
    KernelSpec("MatMulInteger", "MatMul", ("",), (Operand(0, None, 2), Operand(1, None, 3)), weight=1,
               dynamic=True, sim="matmul-integer"),
    # quantizes its float activation (input 0) itself and returns float: only the weight is an operand
    KernelSpec("DynamicQuantizeMatMul", "MatMul", _MS, (None, Operand(1, 2, 3)), weight=1, dynamic=True,
               float_output=True),
    KernelSpec("MatMulIntegerToFloat", "MatMul", _MS, (Operand(0, 2, 4), Operand(1, 3, 5)), weight=1,
               dynamic=True, float_output=True),
)

#: kernel op name -> spec
KERNELS: dict[str, KernelSpec] = {s.name: s for s in _SPECS}

#: integer ops whose operand layout qcompiler does not know: never lowered to or simulated,
#: legal in a model only where a target names them
OPAQUE_KERNELS = frozenset({
    "QLinearWhere", "QAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "MatMulInteger16",
    "MatMulNBits", "MatMulBnb4", "MatMulFpQ4", "GatherBlockQuantized", "QMoE", "NhwcMaxPool",
    "QLinearReduceMean", "QLinearLayerNormalization", "QLinearConvTranspose",
})

#: every op that computes on integer data (never converted to float16, counted as integer)
INTEGER_OPS = frozenset(KERNELS) | OPAQUE_KERNELS


def kernel_spec(op: str | None) -> KernelSpec | None:
    """The spec of kernel op ``op`` (a target's ``kernel_op``), or None if the table has none."""
    return KERNELS.get(op or "")


def kernels_for(float_op: str) -> list[KernelSpec]:
    """The kernels that can replace ``float_op``, in table order."""
    return [s for s in _SPECS if s.float_op == float_op]
