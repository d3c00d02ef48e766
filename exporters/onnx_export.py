"""PyTorch model -> one self-contained ONNX file, and a parity check of it against PyTorch on real images.

Shipped models (export_onnx) go through torch's dynamo (torch.export) path: it folds BatchNorm into the
convolutions and keeps the batch axis symbolic. Opset 18 is the lowest it implements natively; asking for less
makes it run a version converter that fails on some graphs and logs a traceback. Models it cannot export
(data-dependent Python branches) fail with a clear error rather than get one branch baked in.

The per-candidate graph the search measures (graph_bytes) uses the TorchScript exporter instead, for speed
(0.06 s against 1.4 s per small CNN): a branch baked in by tracing is then measured as it is, by trusted code.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """The model could not be exported; the message names the step and the cause."""


class ParityError(RuntimeError):
    """The ONNX model does not compute what the PyTorch model computes (or cannot be run at all)."""


def export_onnx(model: torch.nn.Module, in_shape: tuple[int, int, int], path: str | Path,
                opset: int = DEFAULT_OPSET) -> Path:
    """Write `model` (a copy, in eval mode on CPU) to `path` with a dynamic batch axis, then validate the file.

    The example batch has 2 images: torch.export specialises a dimension traced with size 1.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frozen = copy.deepcopy(model).cpu().eval()
    example = torch.randn(2, *in_shape)
    batch = torch.export.Dim("batch")
    try:
        torch.onnx.export(frozen, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, external_data=False,
                          verbose=False)
    except Exception as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {first}") from e
    proto = onnx.load(str(path))
    strip_debug_info(proto)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"{path} fails onnx.checker: {e}") from e
    return path


def graph_bytes(model: torch.nn.Module, in_shape: tuple[int, int, int], opset: int = 17) -> bytes:
    """`model` (a copy, in eval mode on CPU) as in-memory ONNX bytes with a dynamic batch axis, for the referee.

    This runs once per candidate inside the jail, so it uses the TorchScript exporter (about 0.06 s for a small
    CNN here, against 1.4 s for dynamo); the referee re-measures whatever comes out, so a branch baked in by
    tracing costs accuracy, not trust. Where that export raises (a torch without the TorchScript exporter, or a
    model it cannot trace), the dynamo exporter at opset 18 is tried and its error reported. The example batch
    has 2 images, as in export_onnx.
    """
    frozen = copy.deepcopy(model).cpu().eval()
    example = torch.randn(2, *in_shape)
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(frozen, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, dynamo=False, do_constant_folding=True,
                              training=torch.onnx.TrainingMode.EVAL, keep_initializers_as_inputs=True)
        # Initializers kept as inputs skip the exporter's de-duplication, which merges tensors of equal value (every
        # untrained BatchNorm folds to the same zero bias) and would make an untrained graph count fewer weights than
        # the same model trained. They are then taken out of the inputs again: the graph has one input, the image.
        proto = onnx.load_from_string(buffer.getvalue())
        weights = {t.name for t in proto.graph.initializer}
        image_inputs = [i for i in proto.graph.input if i.name not in weights]
        del proto.graph.input[:]
        proto.graph.input.extend(image_inputs)
        return proto.SerializeToString()
    except Exception:  # noqa: BLE001 - the legacy exporter may be gone; dynamo below reports the real failure
        pass
    try:
        program = torch.onnx.export(frozen, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=DEFAULT_OPSET,
                                    dynamo=True, verbose=False)
        return program.model_proto.SerializeToString()
    except Exception as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {first}") from e


def strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop the per-node stack traces and FX names the exporter records: they hold local paths and are a
    tenth of a small model's file, and no runtime reads them."""
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        del node.metadata_props[:]
        node.doc_string = ""


def _session(onnx_path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def onnx_logits(onnx_path: str | Path, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """onnxruntime logits of float normalised images, run in batches (the file's batch axis is dynamic)."""
    session = _session(onnx_path)
    name = session.get_inputs()[0].name
    array = images.detach().cpu().float().numpy()
    return np.concatenate([session.run(None, {name: array[i : i + batch_size]})[0]
                           for i in range(0, len(array), batch_size)])


@torch.inference_mode()
def torch_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Eval-mode PyTorch logits on CPU, batched like onnx_logits; the caller's model is left as it was."""
    frozen = copy.deepcopy(model).cpu().eval()
    images = images.detach().cpu().float()
    return np.concatenate([frozen(images[i : i + batch_size]).numpy() for i in range(0, len(images), batch_size)])


def parity(model: torch.nn.Module, onnx_path: str | Path, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Compare PyTorch and onnxruntime logits on the same float normalised images.

    Top-1 agreement only means something for trained weights on real images: an untrained net's logits
    are near-ties that rounding flips. A file onnxruntime cannot load, or logits of another shape, is a
    ParityError here already.
    """
    try:
        ours = onnx_logits(onnx_path, images, batch_size)
    except Exception as e:
        raise ParityError(f"onnxruntime cannot run {onnx_path}: {type(e).__name__}: {e}") from e
    reference = torch_logits(model, images, batch_size)
    if ours.shape != reference.shape:
        raise ParityError(f"{onnx_path} gives logits of shape {ours.shape}, PyTorch gives {reference.shape}")
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    return {
        "n": len(reference),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "top1_agreement": float((ours.argmax(1) == reference.argmax(1)).mean()) if len(reference) else math.nan,
        "max_abs_logit": float(np.abs(reference).max()) if reference.size else 0.0,
    }


def check_parity(report: dict, atol: float = 1e-4, min_agreement: float = 0.999) -> dict:
    """Raise ParityError unless max_abs_diff <= atol and top1_agreement >= min_agreement (NaN fails)."""
    problems = []
    if not report["max_abs_diff"] <= atol:
        problems.append(f"max |logit difference| {report['max_abs_diff']:.3g} > {atol:.3g}")
    if not report["top1_agreement"] >= min_agreement:
        problems.append(f"top-1 agreement {report['top1_agreement']:.4%} < {min_agreement:.4%}")
    if problems:
        raise ParityError(f"ONNX model differs from PyTorch on {report['n']} images: " + "; ".join(problems))
    return report
