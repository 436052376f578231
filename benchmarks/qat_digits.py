"""QAT on the digits CNN (the zoo's ``digits_cnn``, trained on scikit-learn's digits): test
accuracy and training loss of float, PTQ (before QAT) and QAT, per scheme.

Usage::

    python benchmarks/qat_digits.py [--epochs 3] [--lr 1e-3] [--threads 1]

For each scheme: ``gp.quant.prepare_qat`` on the trained float model with the activation ranges
calibrated on the training set (min and max over batches of 256; BatchNorm statistics untouched)
gives the PTQ figures (eval mode: weights and activations fake-quantized, BN folded with the
running statistics). Then ``--epochs`` epochs of Adam (batches of 64, fixed order), the last one
with the observers and BatchNorm statistics frozen, give the QAT figures; ``gp.quant.convert``
turns the result into a Program whose accuracy is printed too (it must equal QAT's). "loss" is
the mean cross-entropy on the training set in eval mode. Schemes:

* ``w4 per-channel / a8``: int4 symmetric per-channel weights, int8 asymmetric per-tensor
  activations (the issue's acceptance scheme);
* ``w4 g32 / a8``: as above, with the classifier's weight (K=512) in int4 groups of 32;
* ``w4 per-channel / a8, LSQ``: the first scheme with learned scales;
* ``w4 per-tensor / a4 (stress)``: int4 per-tensor weights, uint4 activations, where PTQ loses
  accuracy.

"float fine-tuned" trains the float model with the same optimizer, epochs and batches: QAT is
also more training, so this is the accuracy QAT is measured against besides the float model's.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F

import graphpress as gp
from graphpress.quant import QuantConfig, QuantSpec
from graphpress.testing.zoo import accuracy, digits_data, get_model

W4 = QuantSpec("int4", "per_channel")
A8 = QuantSpec("int8", "per_tensor", symmetric=False)
SCHEMES: dict[str, tuple[QuantConfig, bool]] = {
    "w4 per-channel / a8": (QuantConfig(weight=W4, activation=A8, name="w4a8"), False),
    "w4 g32 / a8": (QuantConfig(weight=W4, activation=A8, name="w4g32a8").with_overrides(
        ("classifier", QuantConfig(weight=QuantSpec("int4", "per_group", group_size=32),
                                   activation=A8))), False),
    "w4 per-channel / a8, LSQ": (QuantConfig(weight=W4, activation=A8, name="w4a8"), True),
    "w4 per-tensor / a4 (stress)": (QuantConfig(
        weight=QuantSpec("int4", "per_tensor"),
        activation=QuantSpec("uint4", "per_tensor", symmetric=False), name="w4a4"), False),
}


def _loss(model: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
           *, qat: bool) -> float:
    """Adam on fixed-order batches of 64; for QAT the last epoch freezes observers and BN
    statistics. Returns the seconds taken."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for epoch in range(epochs):
        if qat and epoch == epochs - 1:
            gp.quant.enable_observers(model, False)
            gp.quant.freeze_bn_stats(model)
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    return time.perf_counter() - start


def run(config: QuantConfig, *, learn_scales: bool = False, epochs: int = 3,
        lr: float = 1e-3) -> dict[str, float]:
    """Float, PTQ, QAT and converted accuracy / loss of one scheme on the digits CNN."""
    x_train, y_train, x_test, y_test = digits_data()
    model = get_model("digits_cnn").build()
    result = {"float_accuracy": accuracy(model, x_test, y_test),
              "float_loss": _loss(model, x_train, y_train)}
    qat = gp.quant.prepare_qat(model, config, (x_test[:2],), learn_scales=learn_scales,
                               calibration_data=[(b,) for b in x_train.split(256)])
    qat.eval()
    result["ptq_accuracy"] = accuracy(qat, x_test, y_test)
    result["ptq_loss"] = _loss(qat, x_train, y_train)
    result["qat_seconds"] = _train(qat, x_train, y_train, epochs, lr, qat=True)
    qat.eval()
    result["qat_accuracy"] = accuracy(qat, x_test, y_test)
    result["qat_loss"] = _loss(qat, x_train, y_train)
    compiled = gp.quant.convert(qat, dynamic_batch=True)
    result["converted_accuracy"] = accuracy(compiled, x_test, y_test)
    _train(model, x_train, y_train, epochs, lr, qat=False)
    result["float_finetuned_accuracy"] = accuracy(model, x_test, y_test)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = platform.processor() or platform.machine()
    print(f"# QAT on digits_cnn: {args.epochs} epochs, Adam lr={args.lr}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {machine}, "
          f"{datetime.date.today()}")
    header = ("scheme", "float acc", "float fine-tuned acc", "PTQ acc", "QAT acc",
              "converted acc", "float loss",
              "PTQ loss", "QAT loss", "QAT time s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (config, learn) in SCHEMES.items():
        r = run(config, learn_scales=learn, epochs=args.epochs, lr=args.lr)
        print(f"| {name} | {r['float_accuracy']:.2%} | {r['float_finetuned_accuracy']:.2%} | "
              f"{r['ptq_accuracy']:.2%} | "
              f"{r['qat_accuracy']:.2%} | {r['converted_accuracy']:.2%} | "
              f"{r['float_loss']:.4f} | {r['ptq_loss']:.4f} | {r['qat_loss']:.4f} | "
              f"{r['qat_seconds']:.1f} |")


if __name__ == "__main__":
    main()
