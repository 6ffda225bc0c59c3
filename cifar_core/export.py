"""ONNX export and int8 quantization of registered models, and a Predictor-compatible ONNX runner.

    export_onnx(model, "exports/cifar_cnn/fp32.onnx")                 # any registered model
    quantize_onnx("…/fp32.onnx", "…/int8.onnx", calibration_u8, spec)  # static int8 (onnxruntime)
    model, spec = load_onnx("…/int8.onnx"); Predictor(model, spec)    # same preprocessing as torch

Why this route (measured in benchmarks/RESULTS.md, "Level 5"): onnxruntime's static QDQ
quantization gives an artifact that is a plain ONNX file (no pickle, loads in any runtime) and
runs int8 convolutions with VNNI kernels on this CPU; PyTorch's int8 paths need either
torch.compile at load time (PT2E + Inductor) or a pickled TorchScript/ExportedProgram to ship.

The graph takes the *normalized* float input (N x 3 x S x S) and returns logits, exactly like the
torch module: preprocessing stays in `predictor.preprocess`, so torch and ONNX cannot disagree
on it. The ModelSpec rides along in the ONNX metadata, so a file alone is enough to serve it.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import paths

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 20  # 20: GELU is one op (Gelu), not an Erf chain that QDQ would split up


class ExportError(RuntimeError):
    """An export/quantization artifact is missing, malformed or not ours; the message says which."""


# ---------------------------------------------------------------------------------------------
# Graph preparation: fold BatchNorm into the convolution before it
# ---------------------------------------------------------------------------------------------

def _fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by eval-mode bn == one conv with rescaled weights and a bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` with each ConvGroup's BatchNorms folded into its convolutions.

    Our CNN runs conv -> maxpool -> BN. A per-channel affine map with a *positive* scale
    commutes with max-pooling, so BN can move before the pool and fold into the conv: one op
    fewer per stage, and (more important for int8) no float BN between a quantized conv and
    its pool. Where a scale is not positive the group is left unchanged (still exact).
    Models without ConvGroups are returned as an unchanged copy; onnxruntime fuses plain
    conv -> BN pairs itself.
    """
    from .models.cifar_cnn import ConvGroup

    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for group in model.modules():
            if not isinstance(group, ConvGroup):
                continue
            scale1 = group.norm1.weight / torch.sqrt(group.norm1.running_var + group.norm1.eps)
            if bool((scale1 > 0).all()):
                group.conv1 = _fold_bn_into_conv(group.conv1, group.norm1)
                group.norm1 = nn.Identity()
            group.conv2 = _fold_bn_into_conv(group.conv2, group.norm2)
            group.norm2 = nn.Identity()
    return model


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def export_onnx(model: nn.Module, path: str | Path, spec=None, extra_meta: dict | None = None,
                fold: bool = True) -> Path:
    """Write `model` (eval mode, fp32) as a self-contained ONNX file with a dynamic batch axis."""
    import onnx

    spec = spec or model.spec
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = fold_batchnorm(model) if fold else copy.deepcopy(model).eval()
    net = net.float().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, 3, spec.input_size, spec.input_size)
    program = torch.onnx.export(
        net, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    proto = program.model_proto
    _set_metadata(proto, spec, extra_meta)
    onnx.checker.check_model(proto)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(proto, str(tmp), save_as_external_data=False)  # one file: nothing to lose on copy
    tmp.replace(path)
    return path


def _set_metadata(proto, spec, extra: dict | None) -> None:
    # Every value JSON-encoded, strings too: a raw "227e327" (a git hash) would read back as inf.
    entries = {"cifar_core.spec": json.dumps(spec.to_dict()),
               **{f"cifar_core.{k}": json.dumps(v) for k, v in (extra or {}).items()}}
    del proto.metadata_props[:]
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value


def read_metadata(path: str | Path) -> dict:
    """{"spec": ModelSpec, **other cifar_core.* entries} from an exported file."""
    from .models.registry import ModelSpec

    props = _session(path, threads=1).get_modelmeta().custom_metadata_map
    if "cifar_core.spec" not in props:
        raise ExportError(f"{path} has no cifar_core.spec metadata; it was not exported by cifar_core.export")
    spec = json.loads(props["cifar_core.spec"])
    spec["mean"], spec["std"] = tuple(spec["mean"]), tuple(spec["std"])
    out = {"spec": ModelSpec(**spec)}
    for key, value in props.items():
        if key.startswith("cifar_core.") and key != "cifar_core.spec":
            try:
                out[key[len("cifar_core."):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len("cifar_core."):]] = value
    return out


# ---------------------------------------------------------------------------------------------
# Static int8 quantization (onnxruntime, QDQ, calibrated on training images)
# ---------------------------------------------------------------------------------------------

class _CalibrationReader:
    """Feeds preprocessed uint8 images to onnxruntime's calibrator in batches."""

    def __init__(self, images_u8: torch.Tensor, spec, max_batch: int = 64):
        from .predictor import preprocess
        # onnxruntime's histogram calibrators stack per-batch outputs, so every batch must have
        # the same size: the largest divisor of the image count that is not above max_batch.
        batch_size = max(d for d in range(1, min(max_batch, len(images_u8)) + 1) if len(images_u8) % d == 0)
        self.batches = [preprocess(images_u8[i:i + batch_size], spec).contiguous().numpy()
                        for i in range(0, len(images_u8), batch_size)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {INPUT_NAME: self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, calibration_u8: torch.Tensor,
                  spec=None, method: str = "percentile") -> Path:
    """Static int8: per-channel int8 weights, uint8 activations, QDQ format.

    Activation ranges come from `calibration_u8` (training images; never test images).
    method: "minmax", "entropy" or "percentile" (99.999th: clips rare outliers that would
    otherwise waste most of the 256 levels).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    spec = spec or read_metadata(fp32_path)["spec"]
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    prepped = int8_path.with_name(f".{int8_path.stem}.prep.onnx")
    tmp = int8_path.with_name(f".{int8_path.name}.tmp")
    try:
        # Shape inference + graph optimization first, as onnxruntime recommends for QDQ.
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        quantize_static(
            str(prepped), str(tmp), _CalibrationReader(calibration_u8, spec),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=calib,
            extra_options={"CalibPercentile": 99.999} if method == "percentile" else {})
        _copy_metadata(fp32_path, tmp, {"quantization": {
            "tool": "onnxruntime.quantize_static", "format": "QDQ", "weights": "int8 per-channel",
            "activations": "uint8", "calibration": method, "calibration_images": len(calibration_u8)}})
        tmp.replace(int8_path)
    finally:
        prepped.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return int8_path


def _copy_metadata(src: Path, dst: Path, extra: dict) -> None:
    import onnx
    source, target = onnx.load(str(src)), onnx.load(str(dst))
    props = {p.key: p.value for p in source.metadata_props}
    props.update({f"cifar_core.{k}": json.dumps(v) for k, v in extra.items()})
    del target.metadata_props[:]
    for key, value in props.items():
        prop = target.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save_model(target, str(dst))


# ---------------------------------------------------------------------------------------------
# Running an exported file where a torch module is expected
# ---------------------------------------------------------------------------------------------

def _session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for malformed/truncated files
        raise ExportError(f"{path} is not a loadable ONNX model: {e}") from e


class OnnxClassifier(nn.Module):
    """An onnxruntime session behind nn.Module's call interface: normalized float in, logits out.

    Lets `Predictor` (preprocessing, TTA, temperature) and everything built on it use an
    exported or int8 model unchanged.
    """

    def __init__(self, path: str | Path, spec=None, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.spec = spec or read_metadata(self.path)["spec"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits)


def load_onnx(path: str | Path, threads: int | None = None) -> tuple[OnnxClassifier, object]:
    model = OnnxClassifier(path, threads=threads)
    return model, model.spec


# ---------------------------------------------------------------------------------------------
# Whole checkpoints: fp32 + int8 files side by side, with provenance in the metadata
# ---------------------------------------------------------------------------------------------

FP32_FILE = "fp32.onnx"
INT8_FILE = "int8.onnx"


def calibration_images(data, split, count: int = 512, seed: int = 0) -> torch.Tensor:
    """`count` training images, equally many per class: the int8 ranges never see test images."""
    from .engine import stratified_subset
    picks = split.train[stratified_subset(data.labels[split.train], count, seed)]
    return data.images[picks]


def provenance(meta: dict, name: str) -> dict:
    """What a served ONNX file must say about the checkpoint it came from (no pickle, no meta.json)."""
    return {"checkpoint": name, "architecture": meta.get("model"), "code_version": meta.get("code_version"),
            "saved_at": meta.get("saved_at"), "temperature": float(meta.get("temperature", 1.0)),
            "tta": int(meta.get("metrics", {}).get("tta", 0))}


def is_current(onnx_path: str | Path, meta: dict, name: str) -> bool:
    """Whether an export was made from this very checkpoint state: weights *and* temperature
    (`train.py calibrate` renews saved_at too; the temperature is compared as well, for checkpoints
    re-calibrated before it did)."""
    if not Path(onnx_path).is_file():
        return False
    try:
        stored = read_metadata(onnx_path)
    except ExportError:
        return False
    return all(stored.get(k) == v for k, v in provenance(meta, name).items())


def export_checkpoint(model: nn.Module, meta: dict, name: str, out_dir: str | Path,
                      calibration_u8: torch.Tensor) -> dict[str, Path]:
    """Write out_dir/fp32.onnx and out_dir/int8.onnx for one loaded checkpoint."""
    out_dir = Path(out_dir)
    fp32 = export_onnx(model, out_dir / FP32_FILE, extra_meta=provenance(meta, name))
    int8 = quantize_onnx(fp32, out_dir / INT8_FILE, calibration_u8, model.spec)
    return {"fp32": fp32, "int8": int8}


def export_folders(folders: list, data, exports: str | Path | None = None, split_name: str | None = None,
                   split_seed: int | None = None, calibration_count: int = 512):
    """Export each checkpoint folder to <exports>/<folder name>/{fp32,int8}.onnx, the int8 ranges
    calibrated on training images of its own split (or the split given). Yields (folder, files)."""
    from .checkpoint import load_checkpoint
    from .data import make_split
    root = paths.exports_dir(exports)
    for folder in map(Path, folders):
        model, meta = load_checkpoint(folder)
        split = make_split(data, split_name or meta["split"]["name"],
                           meta["split"]["seed"] if split_seed is None else split_seed)
        yield folder, export_checkpoint(model, meta, folder.name, root / folder.name,
                                        calibration_images(data, split, calibration_count))


def find_exports(root: str | Path | None = None, kind: str = "int8") -> list[Path]:
    """Every `<root>/<name>/<kind>.onnx` (root: paths.exports_dir()), sorted by name."""
    root = paths.exports_dir(root)
    return sorted(p / f"{kind}.onnx" for p in root.iterdir() if (p / f"{kind}.onnx").is_file()) \
        if root.is_dir() else []


# ---------------------------------------------------------------------------------------------
# PyTorch's own int8 path, for comparison only
# ---------------------------------------------------------------------------------------------

def fx_quantize(model: nn.Module, calibration_u8: torch.Tensor, spec=None) -> nn.Module:
    """FX graph-mode static int8 ('x86' backend), calibrated like quantize_onnx.

    Measured in the benchmark, not shipped: the result has no pickle-free file format
    (packed int8 weights do not go into safetensors), and PT2E left torch core for torchao
    in this torch version.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    from .predictor import preprocess

    spec = spec or model.spec
    torch.backends.quantized.engine = "x86"
    example = preprocess(calibration_u8[:2], spec)
    prepared = prepare_fx(fold_batchnorm(model), get_default_qconfig_mapping("x86"), (example,))
    with torch.inference_mode():
        for start in range(0, len(calibration_u8), 64):
            prepared(preprocess(calibration_u8[start:start + 64], spec))
    return convert_fx(prepared).eval()
