"""segmentation-models-pytorch architectures by name.

``SegModel`` wraps an smp model and exposes what methods need beyond logits: the encoder's
feature pyramid and the decoder's feature map (``forward_features``). It takes images of any
size: the input is zero-padded (bottom and right) to a multiple of 32, the size every smp
encoder and decoder needs, and the logits are cropped back, so a 321 px crop trains as
UniMatch's does (its ResNet takes any size and resizes its output to the input). Pretrained
encoder weights come through ``segsweep.weights``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segsweep.data.transforms import pad_to_multiple
from segsweep.errors import ConfigError

#: Every architecture a config may name (``model.arch``; the config builds its ``Literal``
#: from these names): the smp class each one builds.
ARCHS: dict[str, type[nn.Module]] = {
    "deeplabv3plus": smp.DeepLabV3Plus,
    "unet": smp.Unet,
    "fpn": smp.FPN,
}


@dataclass
class Features:
    """Encoder pyramid (finest first, smp order), decoder map (B, D, h, w), logits (B, C, H, W)."""

    encoder: list[Tensor]
    decoder: Tensor
    logits: Tensor


def read_torch_file(path: Path, what: str, weights_only: bool = True, hint: str = "") -> Any:
    """``torch.load`` of a file a user named (on the CPU); a missing or unreadable one is a
    one-line ConfigError starting with ``what`` (the field or argument that named it), ending
    with ``hint`` (what file was expected)."""
    if path.is_dir():
        raise ConfigError(f"{what}: a folder, not a file{hint}")
    if not path.is_file():
        raise ConfigError(f"{what}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        how = " as plain weights" if weights_only else ""
        raise ConfigError(f"{what}: cannot read{how} ({type(exc).__name__}){hint}") from None


class SegModel(nn.Module):
    """An smp segmentation model with access to its encoder and decoder features."""

    def __init__(
        self,
        arch: str,
        encoder: str,
        num_classes: int,
        encoder_weights: Path | str | None = None,
        decoder_channels: int | None = None,
        head: HeadOptions | None = None,
        weights_cache: Path | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"model.arch: unknown architecture '{arch}'; valid: {', '.join(ARCHS)}")
        kwargs = {**_decoder_kwargs(arch, decoder_channels), **(head or HeadOptions()).kwargs(arch)}
        try:
            # encoder_weights=None: the platform never downloads weights.
            self.net = ARCHS[arch](encoder_name=encoder, encoder_weights=None, classes=num_classes, **kwargs)
        except (KeyError, ValueError, RuntimeError) as exc:
            # smp's message lists every encoder it has (1.4 KB): keep the line to its reason.
            reason = re.split(r"[,.]?\s*supported encoders", str(exc).strip("'\" "), flags=re.I)[0][:200]
            raise ConfigError(
                f"model.encoder: cannot build '{encoder}' for {arch}: {reason} (smp's encoder names, or "
                "'tu-<timm model>')"
            ) from None
        self.num_classes = num_classes
        #: Where the encoder's weights came from: a file, "imagenet", or None (random).
        self.encoder_weights = encoder_weights
        if encoder_weights is not None:
            from segsweep.models.weights import load_encoder_weights

            load_encoder_weights(self.net.encoder, encoder_weights, encoder, weights_cache)

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    @property
    def encoder_channels(self) -> list[int]:
        return list(self.net.encoder.out_channels)

    @property
    def decoder_channels(self) -> int:
        return int(self.net.segmentation_head[0].in_channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> logits (B, C, H, W)."""
        return self.forward_features(x).logits

    def forward_features(self, x: Tensor) -> Features:
        """Features of ``x`` (B, 3, H, W), any H and W. The encoder and decoder maps are those
        of the input zero-padded to a multiple of 32 (bottom, right); the logits are ``x``'s."""
        enc = self.net.encoder(pad_to_multiple(x, PAD_MULTIPLE)[0])
        dec = self.net.decoder(enc)
        logits = self.head(dec, x.shape[-2:])
        return Features(encoder=enc, decoder=dec, logits=logits)

    def decode(self, encoder_features: list[Tensor], size: tuple[int, int] | torch.Size) -> Tensor:
        """Encoder pyramid (as ``forward_features`` gives it, possibly edited) -> logits at
        ``size``: lets methods decode edited encoder features."""
        return self.head(self.net.decoder(encoder_features), size)

    def head(self, decoder_features: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
        """Decoder map (B, D, h, w) of an input of ``size`` (padded as ``forward_features``
        pads it) -> logits (B, C, *size): lets methods classify edited features."""
        return logits_of_input(self.net.segmentation_head(decoder_features), size)


#: Every smp encoder downsamples 32x at most; inputs are padded to a multiple of this.
PAD_MULTIPLE = 32


def logits_of_input(logits: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Logits of an input of ``size`` padded to a multiple of 32 (bottom, right): upsampled
    to the padded input (bilinear) and cropped back to ``size``."""
    h, w = int(size[0]), int(size[1])
    padded = (h + (-h) % PAD_MULTIPLE, w + (-w) % PAD_MULTIPLE)
    if logits.shape[-2:] != padded:
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
    return logits[..., :h, :w]


@dataclass(frozen=True)
class HeadOptions:
    """Output stride and DeepLabV3+ ASPP settings (``model.*``); None keeps smp's default."""

    output_stride: int | None = None
    aspp_rates: tuple[int, int, int] | None = None
    aspp_dropout: float | None = None
    aspp_separable: bool | None = None

    def kwargs(self, arch: str) -> dict[str, object]:
        if arch != "deeplabv3plus":
            return {}
        named = {
            "encoder_output_stride": self.output_stride,
            "decoder_atrous_rates": self.aspp_rates,
            "decoder_aspp_dropout": self.aspp_dropout,
            "decoder_aspp_separable": self.aspp_separable,
        }
        return {key: value for key, value in named.items() if value is not None}


def _decoder_kwargs(arch: str, channels: int | None) -> dict[str, object]:
    """smp spells the decoder width differently per architecture."""
    if channels is None:
        return {}
    if arch == "deeplabv3plus":
        return {"decoder_channels": channels}
    if arch == "unet":  # one width per decoder block, halving towards full resolution
        return {"decoder_channels": tuple(max(8, channels >> i) for i in range(5))}
    return {"decoder_pyramid_channels": channels, "decoder_segmentation_channels": max(8, channels // 2)}


def build_model(
    arch: str,
    encoder: str,
    num_classes: int,
    encoder_weights: Path | str | None = None,
    decoder_channels: int | None = None,
    head: HeadOptions | None = None,
    weights_cache: Path | None = None,
) -> SegModel:
    return SegModel(arch, encoder, num_classes, encoder_weights, decoder_channels, head, weights_cache)
