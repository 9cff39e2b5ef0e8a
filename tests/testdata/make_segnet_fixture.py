r"""Makes the test fixture of the SegNet checkpoint converter with a PyTorch SegNet.

The PyTorch model below follows the architecture of the authors' SegNet
(spalaciob/s2snets-reconstruction, `models/segnet_autoencoder.py`), written
from its description and generalised over the stage widths: per stage,
conv3x3 (bias) + BatchNorm2d + ReLU layers named `conv{s}{j}`/`bn{s}{j}`,
then `F.max_pool2d(2, 2, return_indices=True)`; the decoder max-unpools with
those indices at the start of each stage, mirrors the convs (`conv{s}{j}d`
maps the width of conv `{s}{j}` back to that of its input; `conv11d` keeps the
first width) and ends with a linear 1x1 `conv_final`.

Run it with a Python that has PyTorch and NumPy (the project does not need
PyTorch), from the repository root:

    python tests/testdata/make_segnet_fixture.py --out_dir tests/testdata

It writes

- `segnet_fixture_state.npz`: the state dict (the authors' key names,
  `num_batches_tracked` included) of a model with `FIXTURE_WIDTHS`;
- `segnet_fixture_reference.npz`: `input` and `output` (float32, NCHW: the
  model runs in eval mode on ImageNet-normalised images), `indices1` ...
  `indices5` (int32, [N, C, H/2, W/2]: PyTorch's pooling indices, flat per
  (n, c) plane, `h * W + w` with the stage's input width W), `seed`,
  `stage_widths` (JSON text) and `torch_version`.

The input has a strongly negative block, so many pooling windows are all
zero after the ReLU (or equal positive values) and tie-breaking is
exercised. Seeds are tried in order until no pooling window holds a near-tie
(distinct top values closer than `MIN_GAP`), which float round-off could
break differently in another framework.
"""

import argparse
import json
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FIXTURE_WIDTHS = ((4, 6), (6, 8), (8, 10, 8), (10, 8, 12), (8, 8, 10))
VGG16_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
INPUT_SHAPE = (2, 3, 32, 32)
MIN_GAP = 1e-4
NUM_BATCHES_TRACKED = 1000


class SegNetEncoder(nn.Module):
    """conv3x3 + BN + ReLU blocks with 2x2 max pooling that keeps its indices."""

    def __init__(self, stage_widths, channels=3, bn_momentum=0.1):
        super().__init__()
        self.stage_widths = tuple(tuple(s) for s in stage_widths)
        width = channels
        for s, widths in enumerate(self.stage_widths, start=1):
            for j, out in enumerate(widths, start=1):
                setattr(self, f"conv{s}{j}", nn.Conv2d(width, out, 3, 1, 1))
                setattr(self, f"bn{s}{j}", nn.BatchNorm2d(out, momentum=bn_momentum))
                width = out

    def forward(self, x, prepool=None):
        indices = []
        for s, widths in enumerate(self.stage_widths, start=1):
            for j in range(1, len(widths) + 1):
                x = F.relu(getattr(self, f"bn{s}{j}")(getattr(self, f"conv{s}{j}")(x)))
            if prepool is not None:
                prepool.append(x)
            x, ind = F.max_pool2d(x, 2, 2, return_indices=True)
            indices.append(ind)
        return x, indices


class SegNetDecoder(nn.Module):
    """Mirror of the encoder: max-unpooling, conv3x3 + BN + ReLU, final linear 1x1 conv."""

    def __init__(self, stage_widths, channels=3, bn_momentum=0.1):
        super().__init__()
        self.stage_widths = tuple(tuple(s) for s in stage_widths)
        for s, widths in enumerate(self.stage_widths, start=1):
            stage_input = self.stage_widths[s - 2][-1] if s > 1 else widths[0]
            ins = (stage_input, *widths[:-1])  # the input width of each encoder conv
            for j in range(len(widths), 0, -1):
                setattr(self, f"conv{s}{j}d", nn.Conv2d(widths[j - 1], ins[j - 1], 3, 1, 1))
                setattr(self, f"bn{s}{j}d", nn.BatchNorm2d(ins[j - 1], momentum=bn_momentum))
        self.conv_final = nn.Conv2d(self.stage_widths[0][0], channels, 1)

    def forward(self, x, indices):
        for s in range(len(self.stage_widths), 0, -1):
            x = F.max_unpool2d(x, indices[s - 1], 2, 2)
            for j in range(len(self.stage_widths[s - 1]), 0, -1):
                x = F.relu(getattr(self, f"bn{s}{j}d")(getattr(self, f"conv{s}{j}d")(x)))
        return self.conv_final(x)


class SegNet(nn.Module):
    """The S2SNet autoencoder (keys `encoder.conv11.weight` ... `decoder.conv_final.bias`)."""

    def __init__(self, stage_widths=VGG16_WIDTHS, channels=3):
        super().__init__()
        self.encoder = SegNetEncoder(stage_widths, channels)
        self.decoder = SegNetDecoder(stage_widths, channels)

    def forward(self, x):
        x, indices = self.encoder(x)
        return self.decoder(x, indices)


@torch.no_grad()
def randomize_(model, generator):
    """Draws weights and BatchNorm running statistics so every tensor matters.

    The first conv's output channels all get a positive kernel sum, so a
    strongly negative input region maps to all-zero activations (tied pooling
    windows) whatever the other weights are.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            w = torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5
            if name == "encoder.conv11":
                w = w.abs() * 0.5 + 0.05
            module.weight.copy_(w)
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
        elif isinstance(module, nn.BatchNorm2d):
            shape = module.weight.shape
            module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
            module.bias.copy_((torch.rand(shape, generator=generator) - 0.5) * 0.6)
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.3)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=generator))
            module.num_batches_tracked.fill_(NUM_BATCHES_TRACKED)


def make_input(generator, shape=INPUT_SHAPE):
    """ImageNet-normalised-like noise with a strongly negative block in every image."""
    x = torch.randn(shape, generator=generator)
    h, w = shape[2:]
    x[:, :, : h // 2, : w // 2] = -4.0
    return x


def min_window_gap(prepool):
    """The smallest gap between the largest and the second-largest distinct window values."""
    gaps = []
    for x in prepool:
        n, c, h, w = x.shape
        windows = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5)
        top = torch.sort(windows.reshape(-1, 4), dim=1, descending=True).values
        gap = top[:, 0] - top[:, 1]
        gaps.append(gap[gap > 0].min().item() if bool((gap > 0).any()) else float("inf"))
    return min(gaps)


def count_zero_windows(x):
    """How many 2x2 windows of `x` (NCHW) are all zero."""
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2)
    return int((windows.amax(dim=(3, 5)) == 0).sum())


def build_fixture(max_seeds=100):
    """(model, input, output, indices, prepool, seed) of the first seed without near-ties."""
    for seed in range(max_seeds):
        generator = torch.Generator().manual_seed(seed)
        model = SegNet(FIXTURE_WIDTHS)
        randomize_(model, generator)
        model.eval()
        x = make_input(generator)
        with torch.no_grad():
            prepool = []
            bottleneck, indices = model.encoder(x, prepool)
            y = model.decoder(bottleneck, indices)
        if min_window_gap(prepool) >= MIN_GAP:
            return model, x, y, indices, prepool, seed
    raise RuntimeError(f"no seed below {max_seeds} gives a fixture without near-ties")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, x, y, indices, prepool, seed = build_fixture()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state_path = os.path.join(args.out_dir, "segnet_fixture_state.npz")
    np.savez_compressed(state_path, **state)
    reference = {
        "input": x.numpy().astype(np.float32),
        "output": y.numpy().astype(np.float32),
        "seed": np.array(seed, np.int64),
        "stage_widths": np.array(json.dumps(FIXTURE_WIDTHS)),
        "torch_version": np.array(torch.__version__),
    }
    for s, ind in enumerate(indices, start=1):
        reference[f"indices{s}"] = ind.numpy().astype(np.int32)
    reference_path = os.path.join(args.out_dir, "segnet_fixture_reference.npz")
    np.savez_compressed(reference_path, **reference)
    print(f"seed {seed}, min window gap {min_window_gap(prepool):.3g}")
    for s, x_s in enumerate(prepool, start=1):
        windows = x_s[:, :, ::2, ::2].numel()
        print(f"stage {s}: {count_zero_windows(x_s)} of {windows} windows are all zero")
    for path in (state_path, reference_path):
        print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
