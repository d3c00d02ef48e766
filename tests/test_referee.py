"""The referee: its numbers against torch's own on exported models, and its refusals on hand-built hostile graphs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgenas.referee import GraphError, inspect, latency_ms, load, normalize, score, score_batch, session
from exporters.onnx_export import graph_bytes

from .conftest import ROOT

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
SMALL = (3, 8, 8)  # the hand-built graphs' image shape: 192 features
rng = np.random.default_rng(0)
W = numpy_helper.from_array(rng.standard_normal((192, 10)).astype(np.float32), "W")


def randomize_batchnorm(model: nn.Module) -> None:
    """Statistics like a trained net's: with the defaults every folded bias is zero, and the exporter stores
    equal constants once, so they would count once."""
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)


class ConvBN(nn.Module):
    """Conv+BN pairs (one Conv without bias), pooling, a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten())
        self.fc = nn.Linear(24, num_classes)
        randomize_batchnorm(self)
        with torch.no_grad():
            self.fc.weight.mul_(10)  # logits far apart: no near-ties for rounding to flip

    def forward(self, x):
        return self.fc(self.features(x))


def probe_image(in_shape) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, *in_shape)).astype(np.float32)


def torch_macs_and_pooling(model: nn.Module, in_shape) -> tuple[int, int]:
    """(conv + linear MACs from torch's FLOP counter, input elements of every pooling layer) for one image."""
    pooled = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: pooled.append(inputs[0].numel()))
             for m in model.modules() if isinstance(m, (nn.MaxPool2d, nn.AdaptiveAvgPool2d))]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, *in_shape))
    for hook in hooks:
        hook.remove()
    return counter.get_total_flops() // 2, sum(pooled)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = ConvBN().eval()
    return model, load(graph_bytes(model, (3, 32, 32)), (3, 32, 32), 10)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    randomize_batchnorm(model)
    return model, load(graph_bytes(model, (3, 224, 224)), (3, 224, 224), 1000)


def test_params_are_torch_params_after_bn_folding(cnn):
    model, graph = cnn
    stats = inspect(graph, probe_image((3, 32, 32)))
    # The exporter folds each BatchNorm into its Conv, which then has a bias whether or not it had one.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    expected = sum(c.weight.numel() + c.out_channels for c in convs) + model.fc.weight.numel() + model.fc.bias.numel()
    assert stats.params == expected == 4178
    assert stats.weight_bytes == 4 * expected
    # torch also counts BN's scale and shift, but not the bias the first (bias-free) Conv gains by folding
    assert sum(p.numel() for p in model.parameters()) - expected == 2 * (16 + 24) - 16


def test_macs_and_activations_of_a_conv_net(cnn):
    model, graph = cnn
    stats = inspect(graph, probe_image((3, 32, 32)))
    conv_gemm, pooled = torch_macs_and_pooling(model, (3, 32, 32))
    assert stats.macs == conv_gemm + pooled
    assert stats.macs_uncounted_ops == {}
    # Every node output for one image: Conv, Relu, MaxPool, Conv, Relu, GlobalAveragePool, Flatten, Gemm.
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, out: outputs.append(out.numel())) for m in model.modules()
             if not isinstance(m, (nn.BatchNorm2d, nn.Sequential, ConvBN))]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert stats.activation_bytes == 4 * sum(outputs)
    assert stats.training_memory_bytes(64) == 3 * stats.weight_bytes + 64 * stats.activation_bytes


def test_macs_of_resnet18(resnet18):
    model, graph = resnet18
    stats = inspect(graph, probe_image((3, 224, 224)))
    conv_gemm, pooled = torch_macs_and_pooling(model, (3, 224, 224))
    assert stats.macs - pooled == pytest.approx(conv_gemm, rel=1e-6)  # residual Adds and Relus are free
    assert stats.macs == pytest.approx(1.815e9, rel=0.01)
    assert stats.params == sum(p.numel() for m in model.modules() if not isinstance(m, nn.BatchNorm2d)
                               for p in m.parameters(recurse=False)) + sum(
        m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def test_score_matches_torch_eval(cnn):
    model, graph = cnn
    images = np.random.default_rng(2).integers(0, 256, (300, 3, 32, 32), dtype=np.uint8)
    labels = np.random.default_rng(3).integers(0, 10, 300)
    stats = inspect(graph, probe_image((3, 32, 32)))
    accuracy, loss = score(session(graph, threads=1), images, labels, MEAN, STD, batch_size=64)
    x = (torch.from_numpy(images).float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    np.testing.assert_array_equal(normalize(images, MEAN, STD), x.numpy())
    with torch.no_grad():
        logits = model(x)
    assert accuracy == pytest.approx((logits.argmax(1).numpy() == labels).mean(), abs=1e-5)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits.double(), torch.from_numpy(labels)).item(),
                                 abs=1e-4)
    assert 0.0 < accuracy < 1.0 and loss > 0.1  # a real test: neither trivially right nor trivially wrong
    assert score_batch(stats, 2**20) == 2**20 // stats.activation_bytes
    assert score_batch(stats, 1) == 1
    assert latency_ms(session(graph, threads=1), probe_image((3, 32, 32)), runs=5, warmup=1) > 0


# Hand-built graphs over an 8x8 image: Flatten, then whatever the attack needs before the logits.
def build(nodes, initializers=(W,), inputs=None, outputs=None, functions=()) -> bytes:
    inputs = inputs or [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SMALL])]
    outputs = outputs or [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])]
    graph = helper.make_graph([helper.make_node("Flatten", ["input"], ["flat"], axis=1), *nodes], "g", inputs,
                              outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(f.domain, 1) for f in functions)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=9).SerializeToString()


MATMUL = helper.make_node("MatMul", ["flat", "W"], ["logits"])


def measure(data: bytes):
    return inspect(load(data, SMALL, 10), probe_image(SMALL))


def test_a_plain_hand_built_graph_is_measured():
    stats = measure(build([MATMUL]))
    assert (stats.params, stats.weight_bytes, stats.macs, stats.num_nodes, stats.opset) == (1920, 7680, 1920, 2, 17)


def axes(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


@pytest.mark.parametrize("stored", ["constant", "int8"])
def test_a_hidden_million_element_weight_is_counted(stored):
    big = rng.standard_normal((100_000, 10)).astype(np.float32)
    if stored == "constant":  # the weight rides in a Constant node's attribute, not in an initializer
        make = [helper.make_node("Constant", [], ["big"], value=numpy_helper.from_array(big, "v"))]
        extra, size = [], 4
    else:  # int8 and cast at run time: counted by elements, whatever their type
        make = [helper.make_node("Cast", ["big8"], ["big"], to=TensorProto.FLOAT)]
        extra, size = [numpy_helper.from_array(big.astype(np.int8), "big8")], 1
    nodes = [*make, helper.make_node("ReduceSum", ["big", "axis0"], ["bias"], keepdims=0),
             helper.make_node("MatMul", ["flat", "W"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["logits"])]
    stats = measure(build(nodes, [W, axes("axis0", [0]), *extra]))
    assert stats.params == 1_000_000 + 1920  # the ReduceSum's axes vector is not a parameter
    assert stats.weight_bytes == size * 1_000_000 + 4 * 1920


def test_a_matmul_emulated_with_mul_and_reducesum_is_not_free():
    nodes = [helper.make_node("Unsqueeze", ["flat", "axis2"], ["column"]),
             helper.make_node("Mul", ["column", "W"], ["products"]),
             helper.make_node("ReduceSum", ["products", "axis1"], ["logits"], keepdims=0)]
    stats = measure(build(nodes, [W, axes("axis2", [2]), axes("axis1", [1])]))
    assert stats.macs >= measure(build([MATMUL])).macs == 192 * 10
    assert stats.macs == 2 * 192 * 10  # one per product (Mul) and one per summed element (ReduceSum)
    assert stats.params == 1920


def test_compute_hidden_in_a_local_function_is_inlined_and_counted():
    hide = helper.make_function("evil", "Hide", ["a", "b"], ["c"], [helper.make_node("MatMul", ["a", "b"], ["c"])],
                                [helper.make_opsetid("", 17)])
    stats = measure(build([helper.make_node("Hide", ["flat", "W"], ["logits"], domain="evil")], functions=[hide]))
    assert (stats.macs, stats.params) == (1920, 1920)


@pytest.mark.parametrize("where", ["initializer", "constant", "function", "relative"])
def test_external_data_never_reads_the_file(tmp_path, monkeypatch, where):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"TOPSECRET-" * 768)  # 7680 bytes: exactly what the (192, 10) float weight needs
    monkeypatch.chdir(tmp_path)
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[192, 10])
    tensor.data_location = TensorProto.EXTERNAL
    location = "secret.bin" if where == "relative" else str(secret)
    tensor.external_data.extend([onnx.StringStringEntryProto(key="location", value=location)])
    if where in ("initializer", "relative"):
        data = build([MATMUL], [tensor])
    elif where == "constant":
        data = build([helper.make_node("Constant", [], ["W"], value=tensor), MATMUL], [])
    else:
        leak = helper.make_function("evil", "Leak", [], ["W"], [helper.make_node("Constant", [], ["W"], value=tensor)],
                                    [helper.make_opsetid("", 17)])
        data = build([helper.make_node("Leak", [], ["W"], domain="evil"), MATMUL], [], functions=[leak])
    with pytest.raises(GraphError, match="external file") as caught:
        measure(data)
    assert "TOPSECRET" not in str(caught.value) and "TOPSECRET" not in repr(caught.value.__cause__)


def test_refusals():
    def refused(data, match, **kwargs):
        with pytest.raises(GraphError, match=match):
            inspect(load(data, kwargs.get("in_shape", SMALL), 10, kwargs.get("max_nodes", 20000)), probe_image(SMALL))

    steal = helper.make_node("Steal", ["flat"], ["x"], name="two\nlines", domain="com.evil")
    refused(build([steal, MATMUL]), "^'Steal' node 'two lines' is from operator domain 'com.evil'; [^\n]*$")
    branch = helper.make_graph([helper.make_node("Identity", ["flat"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    refused(build([helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [1])),
                   helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch), MATMUL]),
            "subgraph")
    refused(build([helper.make_node("NonZero", ["flat"], ["where"]), MATMUL]), "NonZero")
    refused(build([helper.make_node("RandomNormalLike", ["flat"], ["noise"]), MATMUL]), "random")
    training = helper.make_node("Constant", [], ["on"], value=helper.make_tensor("t", TensorProto.BOOL, [], [1]))
    refused(build([training, helper.make_node("Dropout", ["flat", "", "on"], ["dropped"]), MATMUL]), "training_mode")
    second = helper.make_tensor_value_info("other", TensorProto.FLOAT, ["batch", *SMALL])
    refused(build([MATMUL], inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SMALL]),
                                    second]), "exactly one input")
    refused(build([MATMUL]), r"float32 \(batch, 3, 16, 16\)", in_shape=(3, 16, 16))
    refused(build([MATMUL], inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, *SMALL])]),
            "dynamic batch")
    refused(build([MATMUL], outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 7])]),
            r"output 'logits' must be float \(batch, 10\)")
    # the image's values pick a shape: memory that depends on the data
    refused(build([helper.make_node("ReduceMax", ["flat"], ["top"], keepdims=0),
                   helper.make_node("Cast", ["top"], ["n"], to=TensorProto.INT64),
                   helper.make_node("Unsqueeze", ["n", "axis0"], ["shape"]),
                   helper.make_node("ConstantOfShape", ["shape"], ["blob"]), MATMUL], [W, axes("axis0", [0])]),
            "from the image values")
    refused(build([helper.make_node("Identity", ["flat"], ["flat"])] + [MATMUL]), "checker")  # not SSA
    identities = [helper.make_node("Identity", [f"x{i}"], [f"x{i + 1}"]) for i in range(30_000)]
    refused(build([helper.make_node("Identity", ["flat"], ["x0"]), *identities,
                   helper.make_node("MatMul", ["x30000", "W"], ["logits"])]), "30003 nodes")
    inner = helper.make_function("evil", "Inner", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])],
                                 [helper.make_opsetid("", 17)])
    calls = [helper.make_node("Inner", [f"a{i}"], [f"b{i}"], domain="evil") for i in range(200)]
    outer = helper.make_function("evil", "Outer", ["a0"], ["b199"], [
        *(helper.make_node("Identity", [f"b{i}"], [f"a{i + 1}"]) for i in range(199)), *calls],
        [helper.make_opsetid("", 17)])
    refused(build([*(helper.make_node("Outer", ["flat"], [f"o{i}"], domain="evil") for i in range(60)), MATMUL],
                  functions=[inner, outer]), "once its functions are inlined", max_nodes=20000)


@pytest.mark.parametrize("data", [b"", b"\x00\xff garbage \x01" * 50, b"\x08"])
def test_garbage_bytes_are_refused(data):
    with pytest.raises(GraphError):
        load(data, SMALL, 10)


def test_the_referee_does_not_import_torch():
    code = "import sys, edgenas.referee; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_truncated_model_is_refused():
    with pytest.raises(GraphError):
        load(build([MATMUL])[:-40], SMALL, 10)


def test_non_finite_logits_are_refused():
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    data = build([helper.make_node("MatMul", ["flat", "W"], ["mm"]),
                  helper.make_node("Div", ["mm", "zero"], ["logits"])], [W, zero])
    graph = load(data, SMALL, 10)
    inspect(graph, probe_image(SMALL))  # measuring is fine; scoring is not
    images = np.full((4, *SMALL), 128, np.uint8)
    with pytest.raises(GraphError, match="NaN/inf"):
        score(session(graph, threads=1), images, np.zeros(4, np.int64), MEAN, STD, batch_size=2)


def test_a_constant_40_gb_allocation_is_refused_before_it_runs():
    shape = numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["blob"]),
             helper.make_node("ReduceSum", ["blob"], ["total"], keepdims=0),
             helper.make_node("MatMul", ["flat", "W"], ["mm"]), helper.make_node("Add", ["mm", "total"], ["logits"])]
    with pytest.raises(GraphError, match="GiB for one image"):
        measure(build(nodes, [W, shape]))


def test_the_dynamo_fallback_gives_a_graph_the_referee_accepts(monkeypatch, cnn):
    model, graph = cnn
    export = torch.onnx.export

    def without_torchscript(*args, **kwargs):
        if not kwargs.get("dynamo", True):
            raise RuntimeError("the TorchScript exporter was removed")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", without_torchscript)
    fallback = load(graph_bytes(model, (3, 32, 32)), (3, 32, 32), 10)
    ours, theirs = inspect(fallback, probe_image((3, 32, 32))), inspect(graph, probe_image((3, 32, 32)))
    assert (ours.opset, theirs.opset) == (18, 17)
    assert (ours.params, ours.macs) == (theirs.params, theirs.macs)
