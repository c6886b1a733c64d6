"""One rewrite of a converted LiteRT graph: average pooling before the normalization.

Our architectures normalize the uint8 image first (``x / 127.5 - 1``: a MUL and an ADD
by constants) and then average-pool it (4×4 or 8×8) before the first convolution, so
the converter emits MUL and ADD over every input pixel. An average is a weighted sum
whose weights add up to 1, so a per-channel affine map commutes with it: pooling first
runs the MUL and the ADD on 16 or 64 times fewer values. For the default model the
stem went from 131 to 73 µs per image (one thread, batch 8), of ~500 µs in all.

The result differs from the SavedModel by float rounding only; the caller verifies the
artifact against the SavedModel as for any conversion (service.runtimes.conversion).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Builtin operator codes and the float32 tensor type (tensorflow/lite/schema/schema.fbs).
_ADD, _AVERAGE_POOL_2D, _MUL = 0, 1, 18
_FLOAT32 = 0  # TensorType


def pool_before_affine(content: bytes) -> bytes:
    """``content`` with each run of constant MUL/ADD ops that feeds only an average pool
    moved after the pool; unchanged (the same bytes) when there is none."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    codes = [_code(op_code) for op_code in model.operatorCodes]
    changed = False
    for graph in model.subgraphs:
        while _rewrite_one(model, graph, codes):
            changed = True
    if not changed:
        return content
    builder = schema.flatbuffers.Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _code(op_code: Any) -> int:
    # Codes past 127 live in builtinCode; older files keep them in the deprecated field.
    return int(max(op_code.builtinCode, op_code.deprecatedBuiltinCode))


def _rewrite_one(model: Any, graph: Any, codes: list[int]) -> bool:
    ops = graph.operators
    for p, pool in enumerate(ops):
        if codes[pool.opcodeIndex] != _AVERAGE_POOL_2D or not _plain(graph, pool):
            continue
        # Walk back over the affine ops that feed the pool, each one's output read by
        # the next op alone.
        first = p
        while first > 0 and _affine(model, graph, codes, ops[first - 1], ops[first]):
            first -= 1
        if first == p:
            continue
        affine = ops[first:p]
        variable = [_value_input(model, graph, codes, op) for op in affine]
        chain = [op.outputs[0] for op in affine]  # the pool read chain[-1]
        final = pool.outputs[0]
        # The pool reads what the first affine op read; the affine ops then run on the
        # pooled values, in their intermediate tensors given the pool's output shape.
        pool.inputs = [affine[0].inputs[variable[0]], *pool.inputs[1:]]
        pool.outputs = [chain[0]]
        for i, op in enumerate(affine):
            inputs = list(op.inputs)
            inputs[variable[i]] = chain[i]
            op.inputs = inputs
            op.outputs = [chain[i + 1] if i + 1 < len(affine) else final]
        for t in chain:
            _reshape_like(graph.tensors[t], graph.tensors[final])
        graph.operators = [*ops[:first], pool, *affine, *ops[p + 1 :]]
        return True
    return False


def _plain(graph: Any, op: Any) -> bool:
    """No fused activation, and float32 tensors only (quantized arithmetic rounds at
    every op: reordering it would not be rounding-level)."""
    if getattr(op.builtinOptions, "fusedActivationFunction", None):
        return False
    return all(graph.tensors[t].type == _FLOAT32 for t in [*op.inputs, *op.outputs] if t >= 0)


def _affine(model: Any, graph: Any, codes: list[int], op: Any, consumer: Any) -> bool:
    """Whether ``op`` is a float MUL or ADD of a constant with one value in all or one
    per channel, with no activation, whose output ``consumer`` alone reads, as the
    value it works on."""
    if codes[op.opcodeIndex] not in (_MUL, _ADD) or len(op.inputs) != 2 or not _plain(graph, op):
        return False
    variable = _variable_input(model, graph, op)
    if variable < 0:
        return False
    out = op.outputs[0]
    if out in graph.outputs or sum(list(other.inputs).count(out) for other in graph.operators) != 1:
        return False
    read = _value_input(model, graph, codes, consumer)
    if read < 0 or consumer.inputs[read] != out:
        return False
    value = graph.tensors[op.inputs[variable]]
    const = graph.tensors[op.inputs[1 - variable]]
    if value.shape is None or len(value.shape) != 4:
        return False
    shape = [int(d) for d in (const.shape if const.shape is not None else [])]
    channels = int(value.shape[-1])
    if any(d != 1 for d in shape[:-1]):
        return False
    return not shape or shape[-1] in (1, channels)


def _value_input(model: Any, graph: Any, codes: list[int], op: Any) -> int:
    """Which input an op of the run works on: a pool's first, a MUL's or ADD's computed
    one (-1: none)."""
    if codes[op.opcodeIndex] == _AVERAGE_POOL_2D:
        return 0
    return _variable_input(model, graph, op)


def _variable_input(model: Any, graph: Any, op: Any) -> int:
    """Which of a binary op's two inputs is computed rather than a constant (-1: both
    or neither are constants)."""
    constant = [_is_constant(model, graph.tensors[t]) for t in op.inputs]
    if len(constant) != 2 or constant[0] == constant[1]:
        return -1
    return 0 if constant[1] else 1


def _is_constant(model: Any, tensor: Any) -> bool:
    buffer = model.buffers[tensor.buffer] if tensor.buffer else None
    return buffer is not None and buffer.data is not None and len(buffer.data) > 0


def _reshape_like(tensor: Any, like: Any) -> None:
    tensor.shape = np.array(like.shape, dtype=np.int32)
    if like.shapeSignature is not None:
        tensor.shapeSignature = np.array(like.shapeSignature, dtype=np.int32)
