"""Trusted measurement of an untrusted ONNX graph: the numbers the search ranks by, computed outside the jail.

The jail trains a candidate and hands back its eval-mode graph as bytes. That graph is hostile data, so `load`
refuses what could read host files (external data), hide compute from the count (control flow, custom
domains; local functions are inlined first) or make memory depend on the image values; `inspect` runs it
once on a real image to get exact shapes, then counts parameters, MACs and activation bytes from those;
`score` and `latency_ms` run it on data the jail never had. This module must not import torch.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
from google.protobuf.message import DecodeError, Message

from exporters import bench
from exporters.bench import available_cores

SCORE_CAP_BYTES = 512 * 2**20
PROBE_CAP_BYTES = 4 * 2**30

# Refused ops, with the reason the message gives.
DENIED_OPS = {
    # output shapes that depend on the values flowing in: memory a probe image cannot foresee
    **dict.fromkeys(("NonZero", "Unique", "Compress", "NonMaxSuppression"), "its output shape depends on data values"),
    # values that are not tensors: nothing to measure
    **dict.fromkeys(("SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
                     "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional",
                     "OptionalGetElement", "OptionalHasElement", "StringNormalizer", "StringConcat", "StringSplit",
                     "RegexFullMatch", "TfIdfVectorizer"), "it works on sequences, optionals or strings"),
    # random numbers: scores would not reproduce
    **dict.fromkeys(("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli"), "it is random"),
}

REDUCE_OPS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")

# Input slots that take a shape, axes, sizes or counts rather than tensor data. Constants there are not
# parameters, and their values must not come from the image (see load).
SHAPE_SLOTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 3), "Resize": (1, 2, 3),
    "Upsample": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Split": (1,), "OneHot": (1,), "TopK": (1,), "CenterCropPad": (1,), "MaxUnpool": (2,), "Col2Im": (1, 2),
    "AffineGrid": (1,), **{op: (1,) for op in REDUCE_OPS},
}
# A shape-slot constant longer than any shape vector is counted anyway: it could smuggle weights.
SHAPE_VECTOR_MAX = 16

# MAC rules, batch 1: the index of the weight (Conv-like) or left operand (MatMul-like) input.
CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
MATMUL_LEFT = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0}
# One MAC per output element: so that a convolution emulated with Mul + ReduceSum is not nearly free.
PER_OUTPUT_OPS = frozenset({"Mul", "Div", "BatchNormalization", "InstanceNormalization", "LayerNormalization",
                            "GroupNormalization", "Softmax", "LogSoftmax"})
PER_INPUT_OPS = frozenset({*REDUCE_OPS, "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "AveragePool",
                           "MaxPool", "LpPool", "ArgMax", "ArgMin"})
# Cheap data movement, comparisons and elementwise activations: neither counted nor reported as uncounted.
FREE_OPS = frozenset({
    "Abs", "Add", "And", "BitShift", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant",
    "ConstantOfShape", "DepthToSpace", "Dropout", "Elu", "Equal", "Erf", "Expand", "EyeLike", "Flatten", "Floor",
    "Gather", "GatherElements", "GatherND", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish",
    "Identity", "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mish", "Neg", "Not",
    "OneHot", "Or", "PRelu", "Pad", "Range", "Relu", "Reshape", "Round", "ScatterElements", "ScatterND", "Selu",
    "Shape", "Shrink", "Sigmoid", "Sign", "Size", "Slice", "Softplus", "Softsign", "SpaceToDepth", "Split",
    "Squeeze", "Sub", "Sum", "Tanh", "ThresholdedRelu", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where", "Xor",
})
FLOAT_OUTPUTS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


class GraphError(ValueError):
    """A graph the referee refuses; the message is one line an LLM can act on."""


class TooSlow(GraphError):
    """Running the graph went past the deadline it was given: it was stopped, not waited for."""


def _run(sess: ort.InferenceSession, outputs, feed: dict, deadline: float | None):
    """session.run, stopped by onnxruntime itself (RunOptions.terminate, set from a timer) at `deadline`."""
    if deadline is None:
        return sess.run(outputs, feed)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TooSlow("the model is too slow: measuring it went past the time limit")
    options = ort.RunOptions()
    timer = threading.Timer(remaining, lambda: setattr(options, "terminate", True))
    timer.start()
    try:
        return sess.run(outputs, feed, options)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
        if options.terminate:
            raise TooSlow("the model is too slow: measuring it went past the time limit") from e
        raise
    finally:
        timer.cancel()


def _clean(text: str) -> str:
    """A name from the graph, fit for a one-line message: the graph's author chose it."""
    return " ".join(text.split())[:80]


def _node(node: onnx.NodeProto) -> str:
    return f"'{_clean(node.op_type)}' node '{_clean(node.name)}'"


def _first_line(e: BaseException, limit: int = 300) -> str:
    line = next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)
    return line[:limit]


def _messages(root: Message):
    """Every protobuf message under `root`: tensors hide in attributes, functions and training info alike."""
    stack = [root]
    while stack:
        message = stack.pop()
        yield message
        for field, value in message.ListFields():
            if field.message_type is not None:
                stack.extend([value] if isinstance(value, Message) else value)


def _inlined_size(model: onnx.ModelProto) -> int:
    """Nodes the main graph will have once local functions are inlined, without inlining: a few calls of a
    function that calls a function can multiply into millions of nodes."""
    functions = {(f.domain, f.name): f for f in model.functions}
    sizes: dict[tuple[str, str], int] = {}

    def size(nodes, stack: tuple) -> int:
        total = 0
        for node in nodes:
            key = (node.domain, node.op_type)
            if key not in functions:
                total += 1
                continue
            if key in stack:
                raise GraphError(f"local function '{node.op_type}' calls itself; ONNX functions cannot recurse")
            if key not in sizes:
                sizes[key] = size(functions[key].node, (*stack, key))
            total += sizes[key]
        return total

    return size(model.graph.node, ())


def _describe(value: onnx.ValueInfoProto) -> str:
    t = value.type.tensor_type
    dims = [_clean(d.dim_param) or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in t.shape.dim]
    dtype = onnx.TensorProto.DataType.Name(t.elem_type) if t.elem_type else "no tensor type"
    return f"{dtype.lower()} ({', '.join(dims)})" if t.HasField("shape") else f"{dtype.lower()} of unknown shape"


def _fixed(dim) -> bool:
    return dim.HasField("dim_value")


def load(data: bytes, in_shape: tuple[int, int, int], num_classes: int, max_nodes: int = 20000) -> onnx.ModelProto:
    """Parse untrusted ONNX bytes and refuse whatever the referee cannot measure safely (GraphError).

    Accepted: one float32 input (batch, *in_shape) with a dynamic batch axis, one float output
    (batch, num_classes), standard ONNX ops only, no control flow, no external data, shapes that depend on
    constants and tensor shapes but never on the image's values, at most max_nodes nodes after inlining.
    """
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, TypeError) as e:
        raise GraphError(f"the bytes are not an ONNX model: {_first_line(e)}") from e
    raw_nodes = len(model.graph.node) + sum(len(f.node) for f in model.functions)
    if raw_nodes > max_nodes:
        raise GraphError(f"the graph has {raw_nodes} nodes, more than the limit of {max_nodes}")
    for message in _messages(model):
        if isinstance(message, onnx.TensorProto) and (message.data_location == onnx.TensorProto.EXTERNAL
                                                      or len(message.external_data)):
            raise GraphError(f"tensor '{_clean(message.name)}' keeps its data in an external file; "
                             "export with every weight inside the model")
        if isinstance(message, onnx.SparseTensorProto):
            raise GraphError("the graph holds a sparse tensor; export dense weights")
        if isinstance(message, onnx.NodeProto) and any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                       or a.HasField("g") or len(a.graphs) for a in message.attribute):
            raise GraphError(f"{_node(message)} has a subgraph (control flow hides compute from the "
                             "count); write forward without data-dependent branches or loops")
    model.ClearField("training_info")  # onnxruntime ignores it and so do we
    inlined = _inlined_size(model)
    if inlined > max_nodes:
        raise GraphError(f"the graph has {inlined} nodes once its functions are inlined, more than {max_nodes}")
    if model.functions:
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as e:  # noqa: BLE001 - the C++ inliner raises assorted types on malformed functions
            raise GraphError(f"the graph's local functions cannot be inlined: {_first_line(e)}") from e
        del model.functions[:]
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise GraphError(f"{_node(node)} is from operator domain '{_clean(node.domain)}'; only standard "
                             "ONNX operators are allowed")
        if node.op_type in DENIED_OPS:
            raise GraphError(f"{_node(node)} is not allowed: {DENIED_OPS[node.op_type]}")
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            raise GraphError(f"{_node(node)} is not allowed: dropout with a training_mode input is random")
    _check_io(model.graph, in_shape, num_classes)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - checker, shape-inference and protobuf errors alike
        raise GraphError(f"the graph fails onnx.checker: {_first_line(e)}") from e
    _check_shapes_from_constants(model.graph)
    return model


def _image(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    """The one graph input that is not an initializer (initializers may be listed as inputs too)."""
    initializers = {t.name for t in graph.initializer}
    return next(i for i in graph.input if i.name not in initializers)


def _check_io(graph: onnx.GraphProto, in_shape: tuple[int, int, int], num_classes: int) -> None:
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise GraphError(f"the graph must have exactly one input (the image batch); it has {len(inputs)}")
    want = f"float32 (batch, {', '.join(map(str, in_shape))}) with a dynamic batch axis"
    image = inputs[0].type.tensor_type
    dims = image.shape.dim
    if (image.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or _fixed(dims[0])
            or any(not _fixed(d) or d.dim_value != n for d, n in zip(dims[1:], in_shape, strict=True))):
        raise GraphError(f"input '{_clean(inputs[0].name)}' must be {want}; it is {_describe(inputs[0])}")
    if len(graph.output) != 1:
        raise GraphError(f"the graph must have exactly one output (the logits); it has {len(graph.output)}")
    logits = graph.output[0].type.tensor_type
    dims = logits.shape.dim
    if (logits.elem_type not in FLOAT_OUTPUTS or len(dims) != 2 or _fixed(dims[0])
            or not _fixed(dims[1]) or dims[1].dim_value != num_classes):
        raise GraphError(f"output '{_clean(graph.output[0].name)}' must be float (batch, {num_classes}) with a dynamic "
                         f"batch axis; it is {_describe(graph.output[0])}")


def _check_shapes_from_constants(graph: onnx.GraphProto) -> None:
    """Shape slots must be computed from constants and tensor shapes, never from the image's values: else the
    memory a graph needs depends on the data and one probe image cannot foresee it."""
    from_values = {_image(graph).name}
    for node in graph.node:  # the checker has made sure the nodes are in topological order
        for slot in SHAPE_SLOTS.get(node.op_type, ()):
            if slot < len(node.input) and node.input[slot] in from_values:
                raise GraphError(f"{_node(node)} takes input {slot} (a shape) from the "
                                 "image values; shapes may depend only on constants and tensor shapes")
        if node.op_type not in ("Shape", "Size") and any(name in from_values for name in node.input):
            from_values.update(node.output)


@dataclass(frozen=True)
class GraphStats:
    """What one graph costs, for batch 1, computed by the referee from the graph alone."""

    params: int
    weight_bytes: int
    macs: int
    macs_uncounted_ops: dict[str, int]
    activation_bytes: int
    num_nodes: int
    opset: int

    def training_memory_bytes(self, batch_size: int) -> int:
        """An estimate, deterministic and computed from the graph: weights, their gradients and SGD momentum,
        plus every activation a training step keeps for backward (all non-constant node outputs) per image."""
        return 3 * self.weight_bytes + batch_size * self.activation_bytes


def _tensor_size(tensor: onnx.TensorProto) -> tuple[int, int]:
    """(elements, bytes) of a tensor as its dims declare it; the probe run has checked they match the data."""
    elements = math.prod(tensor.dims)
    if tensor.data_type == onnx.TensorProto.STRING:
        return elements, sum(len(s) for s in tensor.string_data)
    return elements, elements * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _einsum_macs(equation: str, shapes: list[tuple[int, ...]]) -> int:
    """Product of every index's size (the ellipsis counting as its broadcast dims): the full contraction."""
    sizes: dict[str, int] = {}
    ellipsis: tuple[int, ...] = ()
    for term, shape in zip(equation.replace(" ", "").split("->")[0].split(","), shapes, strict=True):
        letters = term.replace("...", "")
        if "..." in term:
            start, width = term.index("..."), len(shape) - len(letters)
            ellipsis = np.broadcast_shapes(ellipsis, shape[start : start + width])
            shape = shape[:start] + shape[start + width :]
        for letter, size in zip(letters, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return math.prod(sizes.values()) * math.prod(ellipsis)


def _node_macs(node: onnx.NodeProto, shape) -> int | None:
    """MACs of one node at batch 1 from exact shapes, or None when the op's compute is not counted."""
    op = node.op_type
    if op in CONV_WEIGHT:
        return math.prod(shape(node.output[0])) * math.prod(shape(node.input[CONV_WEIGHT[op]])[1:])
    if op == "ConvTranspose":
        return math.prod(shape(node.input[0])) * math.prod(shape(node.input[1])[1:])
    if op == "Gemm":
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        left = shape(node.input[0])
        return math.prod(shape(node.output[0])) * left[0 if trans_a else 1]
    if op in MATMUL_LEFT:
        return math.prod(shape(node.output[0])) * shape(node.input[MATMUL_LEFT[op]])[-1]
    if op == "Einsum":
        equation = next(a.s.decode() for a in node.attribute if a.name == "equation")
        return _einsum_macs(equation, [shape(name) for name in node.input])
    if op in PER_OUTPUT_OPS:
        return math.prod(shape(node.output[0]))
    if op in PER_INPUT_OPS:
        return math.prod(shape(node.input[0]))
    return None


def _static_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every node output whose shape ONNX shape inference (with data propagation) can tell for one
    image, before anything runs: a graph that allocates 40 GB from a constant shape is caught here. Weights
    travel as typed inputs, not data: inference needs only the small shape vectors."""
    graph = model.graph
    small = [t for t in graph.initializer if math.prod(t.dims) <= SHAPE_VECTOR_MAX]
    large = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer
             if math.prod(t.dims) > SHAPE_VECTOR_MAX]
    image = onnx.ValueInfoProto()
    image.CopyFrom(_image(graph))
    image.type.tensor_type.shape.dim[0].dim_value = 1
    skeleton = onnx.helper.make_model(
        onnx.helper.make_graph(graph.node, graph.name, [image, *large], graph.output, initializer=small),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is only a pre-check; the probe run reports real errors
        return 0
    total = 0
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        tensor = value.type.tensor_type
        if tensor.elem_type and all(d.HasField("dim_value") for d in tensor.shape.dim):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
            total += itemsize * math.prod(d.dim_value for d in tensor.shape.dim)
    return total


def _probe(model: onnx.ModelProto, probe: np.ndarray, deadline: float | None) -> dict[str, np.ndarray]:
    """Every node output's value on one image: a copy of the graph with each of them made a graph output
    (onnxruntime accepts outputs without type information, so no shape inference is needed)."""
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    present = {o.name for o in probed.graph.output}
    names = [name for node in probed.graph.node for name in node.output if name and name not in present]
    probed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    try:
        sess = session(probed, available_cores(), optimize=False)
        values = _run(sess, None, {model.graph.input[0].name: probe}, deadline)
    except TooSlow:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise GraphError(f"onnxruntime cannot run the graph on a validation image: {_first_line(e)}") from e
    return {o.name: v for o, v in zip(sess.get_outputs(), values, strict=True)}


def inspect(model: onnx.ModelProto, probe: np.ndarray, max_bytes: int = PROBE_CAP_BYTES,
            deadline: float | None = None) -> GraphStats:
    """Params, weight bytes, MACs and activation bytes of a graph from `load`, from one run on `probe` (one real
    normalised image, float32 (1, C, H, W)), which gives every intermediate shape exactly.

    Parameters are the elements of constant tensors (initializers, Constant nodes, tensor attributes) that
    feed at least one data slot, whatever their type: an int8 weight behind a Cast counts, a Reshape's shape
    vector does not. BatchNorm folded into a Conv by the exporter counts as the Conv's weight and bias.
    Before the run, tensors whose size shape inference can tell must fit max_bytes together (GraphError).
    """
    graph = model.graph
    image = _image(graph)
    dims = [d.dim_value for d in image.type.tensor_type.shape.dim[1:]]
    if probe.dtype != np.float32 or probe.shape != (1, *dims):
        raise ValueError(f"the probe must be float32 (1, {', '.join(map(str, dims))}); got {probe.dtype} {probe.shape}")
    needed = _static_bytes(model)
    if needed > max_bytes:
        raise GraphError(f"the graph's tensors take {needed / 2**30:.1f} GiB for one image, more than the limit of "
                         f"{max_bytes / 2**30:.1f} GiB")
    values = _probe(model, probe, deadline)
    num_classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
    logits = values[graph.output[0].name]
    if logits.shape != (1, num_classes):
        raise GraphError(f"the model gives logits of shape {logits.shape} for one image; expected (1, {num_classes})")

    constants = {t.name: _tensor_size(t) for t in graph.initializer}
    constants.update({n.output[0]: (values[n.output[0]].size, values[n.output[0]].nbytes)
                      for n in graph.node if n.op_type == "Constant"})
    shapes = {t.name: tuple(t.dims) for t in graph.initializer} | {k: v.shape for k, v in values.items()}
    shapes[image.name] = probe.shape
    counted: set[str] = {o.name for o in graph.output if o.name in constants}
    attribute_sizes = []
    from_image = {image.name}
    macs, uncounted = 0, Counter()
    for node in graph.node:
        slots = SHAPE_SLOTS.get(node.op_type, ())
        counted.update(name for slot, name in enumerate(node.input) if name in constants
                       and (slot not in slots or constants[name][0] > SHAPE_VECTOR_MAX))
        if node.op_type != "Constant":  # a Constant's value is counted through its output, above
            attribute_sizes += [_tensor_size(t) for a in node.attribute
                                for t in (*a.tensors, *([a.t] if a.HasField("t") else []))]
        if any(name in from_image for name in node.input):
            from_image.update(node.output)
        node_macs = _node_macs(node, shapes.__getitem__)
        if node_macs is not None:
            macs += node_macs
        elif node.op_type not in FREE_OPS:
            uncounted[node.op_type] += 1
    sizes = [constants[name] for name in counted] + attribute_sizes
    return GraphStats(
        params=sum(n for n, _ in sizes), weight_bytes=sum(b for _, b in sizes), macs=int(macs),
        macs_uncounted_ops=dict(uncounted),
        activation_bytes=sum(int(v.nbytes) for k, v in values.items() if k in from_image),
        num_nodes=len(graph.node),
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0),
    )


def session(model_or_bytes: onnx.ModelProto | bytes, threads: int, optimize: bool = True) -> ort.InferenceSession:
    """CPU session from bytes (never a path: nothing on the host is read) with a fixed intra-op thread count.

    Only give it graphs that passed `load`. optimize=False is for probing: no fusions around the extra outputs.
    """
    data = model_or_bytes.SerializeToString() if isinstance(model_or_bytes, onnx.ModelProto) else model_or_bytes
    return bench.session(data, threads, optimize)


def score_batch(stats: GraphStats, cap_bytes: int = SCORE_CAP_BYTES) -> int:
    """Images per scoring batch such that every activation of the batch together stays under cap_bytes."""
    return max(1, cap_bytes // max(1, stats.activation_bytes))


def normalize(images_uint8: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 (x/255 - mean)/std per channel, as the model was trained to see them."""
    mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return (images_uint8.astype(np.float32) / np.float32(255) - mean) / std


def score(sess: ort.InferenceSession, images_uint8: np.ndarray, labels: np.ndarray, mean, std,
          batch_size: int, deadline: float | None = None) -> tuple[float, float]:
    """(accuracy in 0..1, mean cross-entropy) on uint8 images (N, C, H, W) normalised as (x/255 - mean)/std.

    Images go in, in batches, in a fresh secret order, so a graph cannot tell which image sits at which position
    of a batch (one that knows the labels in their stored order would otherwise just output them). Per-image
    losses are summed in the stored order, so the result does not depend on the shuffle. The log-softmax is taken
    in float64. Logits of the wrong shape or NaN/inf logits are a GraphError; past `deadline`, TooSlow.
    """
    if len(images_uint8) == 0 or len(images_uint8) != len(labels):
        raise ValueError(f"need one label per image, at least one: {len(images_uint8)} images, {len(labels)} labels")
    name, output = sess.get_inputs()[0].name, sess.get_outputs()[0]
    num_classes = output.shape[1]
    labels = np.asarray(labels, np.int64)
    order = np.random.default_rng(int.from_bytes(os.urandom(8), "little")).permutation(len(labels))
    losses, hits = np.empty(len(labels)), np.empty(len(labels), dtype=bool)
    for start in range(0, len(labels), batch_size):
        pick = order[start : start + batch_size]
        x, y = normalize(images_uint8[pick], mean, std), labels[pick]
        try:
            logits = _run(sess, [output.name], {name: x}, deadline)[0]
        except TooSlow:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise GraphError(f"onnxruntime failed on validation images: {_first_line(e)}") from e
        if logits.shape != (len(y), num_classes):
            raise GraphError(f"the model gives logits of shape {logits.shape} for a batch of {len(y)} images; "
                             f"expected ({len(y)}, {num_classes})")
        if not np.isfinite(logits).all():
            raise GraphError("the model produced NaN/inf logits on validation images")
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        losses[pick] = -log_p[np.arange(len(y)), y]
        hits[pick] = z.argmax(axis=1) == y
    return float(hits.mean()), float(losses.sum()) / len(labels)


def latency_ms(sess: ort.InferenceSession, example: np.ndarray, runs: int, warmup: int,
               deadline: float | None = None) -> float:
    """Median of `runs` timed session.run calls on a batch-1 example after `warmup` untimed ones (fewer when
    `deadline` comes first; at least one)."""
    return float(np.median(bench.timed_runs(sess, {sess.get_inputs()[0].name: example}, runs, warmup, deadline)))
