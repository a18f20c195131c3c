"""Pretrained encoder weights (``model.encoder_weights``).

``imagenet``: the weights smp or timm publish for the encoder, through their own loaders and
the Hugging Face hub cache (``model.weights_cache``, else the hub's default). A machine
without internet reads them from that cache; ``segsweep weights`` fills it on one that has
internet (``fetch``). A path: a local state_dict, which must cover every encoder key; files in
``efficientnet_pytorch``'s key names are converted to timm's EfficientNet names.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import Tensor, nn

from segsweep.errors import ConfigError

IMAGENET = "imagenet"
#: Seconds the hub waits for a server's answer before falling back to its cache (its
#: default is 10; HF_HUB_ETAG_TIMEOUT, where set, wins).
ETAG_TIMEOUT_S = 5
#: Seconds to wait for a connection to the hub before treating the machine as offline.
CONNECT_TIMEOUT_S = 3
#: Buffers a file may leave out: BatchNorm's step counter, unused by its default momentum.
OPTIONAL_SUFFIXES = (".num_batches_tracked",)
#: The command that fills a cache on a machine with internet.
FETCH_COMMAND = "segsweep weights <config or spec> --cache"


# ---------------------------------------------------------------------------------------------
# entry points


def load_encoder_weights(
    encoder: nn.Module, source: str | Path, encoder_name: str, cache: Path | None
) -> None:
    """Load ``source`` ("imagenet" or a state_dict file) into ``encoder`` (smp's encoder named
    ``encoder_name``, built randomly initialised); every encoder key must be covered. Anything
    the user can fix is a one-line ``ConfigError``."""
    if isinstance(source, str) and source == IMAGENET:
        pretrained = pretrained_encoder(encoder_name, cache, depth=int(getattr(encoder, "_depth", 5)))
        encoder.load_state_dict(pretrained.state_dict(), strict=True)
        return
    load_file_weights(encoder, Path(source))


def fetch(encoders: list[str], cache: Path | None, echo: Callable[[str], None]) -> None:
    """Download each encoder's imagenet weights into ``cache`` (None: the hub's default),
    through the loader ``load_encoder_weights`` uses; one line per encoder says where."""
    for name in encoders:
        pretrained_encoder(name, cache)
        echo(f"{name}: imagenet weights in {weights_location(name, cache)}")


# ---------------------------------------------------------------------------------------------
# imagenet: smp's and timm's loaders, the hub cache


@contextlib.contextmanager
def hub_cache(cache: Path | None) -> Iterator[Path]:
    """Within the block the hub reads and writes ``cache`` (None: its own default), waits at
    most ``ETAG_TIMEOUT_S`` for a server, honours HF_HUB_OFFLINE as set now, and is offline at
    once where its server takes no connection; yields the folder. timm's weights that come by
    URL go to ``cache``/torch. Everything is restored."""
    from huggingface_hub import constants

    names = ("HF_HUB_CACHE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_OFFLINE")
    saved = {name: getattr(constants, name) for name in names}
    saved_env = {name: os.environ.get(name) for name in ("HF_HUB_CACHE", "TORCH_HOME")}
    folder = Path(cache) if cache is not None else Path(constants.HF_HUB_CACHE)
    try:
        if cache is not None:
            constants.HF_HUB_CACHE = str(folder)
            os.environ["HF_HUB_CACHE"] = str(folder)
            os.environ["TORCH_HOME"] = str(folder / "torch")
        if "HF_HUB_ETAG_TIMEOUT" not in os.environ:
            constants.HF_HUB_ETAG_TIMEOUT = ETAG_TIMEOUT_S
        if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
            constants.HF_HUB_OFFLINE = True
        elif not constants.HF_HUB_OFFLINE and not hub_reachable(constants.ENDPOINT):
            # Offline at once: the hub would retry a dead network for half a minute per file.
            constants.HF_HUB_OFFLINE = True
        yield folder
    finally:
        for name, value in saved.items():
            setattr(constants, name, value)
        for name, env in saved_env.items():
            if env is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = env


def hub_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether the hub's server takes a connection within ``timeout`` seconds (True where a
    proxy is set: it is the proxy's to reach the hub)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def pretrained_encoder(name: str, cache: Path | None, depth: int = 5) -> nn.Module:
    """smp's encoder ``name`` with its published imagenet weights (timm's default pretrained
    weights for ``tu-`` names), read from or downloaded into ``cache``."""
    weights: str | bool = True if _timm_name(name) is not None else IMAGENET
    _require_published(name)
    from segmentation_models_pytorch.encoders import get_encoder

    with hub_cache(cache) as folder:
        try:
            return get_encoder(name, in_channels=3, depth=depth, weights=weights)
        except _download_errors() as exc:
            raise ConfigError(
                f"model.encoder_weights: imagenet weights of '{name}' are not in {folder} and cannot "
                f"be downloaded here ({_reason(exc)}); fetch them on a machine with internet: "
                f"{FETCH_COMMAND} {folder}, then set model.weights_cache to that folder"
            ) from None


def _reason(exc: BaseException) -> str:
    """Why a download failed, in a few words."""
    from huggingface_hub import constants

    return "offline" if constants.HF_HUB_OFFLINE else type(exc).__name__


def weights_location(name: str, cache: Path | None) -> Path:
    """The folder of the cache that holds ``name``'s imagenet weights."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(cache) if cache is not None else Path(constants.HF_HUB_CACHE)
    timm_name = _timm_name(name)
    if timm_name is None:
        repo = _smp_settings(name)[IMAGENET]["repo_id"]
    else:
        import timm

        hub_id = timm.models.get_pretrained_cfg(timm_name).hf_hub_id
        if not hub_id:  # timm fetches it by URL, into torch's hub folder
            return (
                folder / "torch" / "hub" / "checkpoints" if cache is not None else Path(torch.hub.get_dir())
            )
        repo = hub_id.split("@")[0]
    return folder / repo_folder_name(repo_id=repo, repo_type="model")


def _timm_name(name: str) -> str | None:
    """The timm model behind smp's encoder ``name`` (``tu-`` and the ``timm-`` names smp maps
    to them), or None for smp's own encoders."""
    from segmentation_models_pytorch.encoders import is_equivalent_to_timm_universal

    if is_equivalent_to_timm_universal(name):  # as smp's get_encoder renames them
        name = name.replace("timm-", "tu-")
        if "mobilenetv3" in name:
            name = name.replace("tu-", "tu-tf_")
    return name[3:] if name.startswith("tu-") else None


def _smp_settings(name: str) -> dict[str, dict[str, str]]:
    from segmentation_models_pytorch.encoders import encoders

    if name not in encoders:
        raise ConfigError(
            f"model.encoder: '{name}' is not an smp encoder (smp's names, or 'tu-<timm model>')"
        )
    return dict(encoders[name]["pretrained_settings"])


def _require_published(name: str) -> None:
    """A one-line ConfigError unless smp or timm publishes pretrained weights for ``name``."""
    timm_name = _timm_name(name)
    if timm_name is None:
        published = _smp_settings(name)
        if IMAGENET not in published:
            raise ConfigError(
                f"model.encoder_weights: smp publishes no imagenet weights for '{name}' "
                f"(its weights: {', '.join(published) or 'none'})"
            )
        return
    import timm

    if not timm.is_model(timm_name):
        raise ConfigError(f"model.encoder: '{name}': timm has no model '{timm_name}'")
    if not timm.models.is_model_pretrained(timm_name):
        tags = timm.list_pretrained(f"{timm_name.split('.')[0]}.*")
        raise ConfigError(
            f"model.encoder_weights: timm publishes no pretrained weights for '{name}' "
            f"(its weights: {', '.join('tu-' + t for t in tags) or 'none'})"
        )


def _download_errors() -> tuple[type[BaseException], ...]:
    """What the hub and timm raise when a file is neither cached nor downloadable: offline
    mode, no network, a server's refusal (all OSErrors), or an entry missing from the hub."""
    from huggingface_hub.errors import EntryNotFoundError

    errors: tuple[type[BaseException], ...] = (OSError, EntryNotFoundError)
    with contextlib.suppress(ImportError):
        import httpx2

        errors += (httpx2.HTTPError,)
    with contextlib.suppress(ImportError):
        import httpx

        errors += (httpx.HTTPError,)
    return errors


# ---------------------------------------------------------------------------------------------
# a local file


def load_file_weights(encoder: nn.Module, path: Path) -> None:
    """Load the state_dict file ``path`` into ``encoder``: keys with or without smp's
    ``model.`` (or a whole model's ``encoder.``) prefix, ``efficientnet_pytorch`` names
    converted; every encoder key must be matched, with its shape. Extra keys (a classifier
    head) are ignored."""
    from segsweep.models.network import read_torch_file

    what = f"model.encoder_weights: {path}"
    state = read_torch_file(path, what)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ConfigError(f"{what}: not a state_dict (a {type(state).__name__})")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    own = encoder.state_dict()
    if is_efficientnet_pytorch(tensors):
        tensors = convert_efficientnet_pytorch(tensors, list(own))
    matched = align_keys(tensors, own)
    if not matched:
        first = next(iter(tensors), "none")
        raise ConfigError(f"{what}: no key matches the encoder (first unexpected: {first})")
    for key, value in matched.items():
        if value.shape != own[key].shape:
            raise ConfigError(
                f"{what}: {key} has shape {tuple(value.shape)} in the file, "
                f"{tuple(own[key].shape)} in the encoder"
            )
    required = [k for k in own if not k.endswith(OPTIONAL_SUFFIXES)]
    missing = [k for k in required if k not in matched]
    if missing:
        raise ConfigError(
            f"{what}: {len(missing)} of {len(required)} encoder keys missing (first: {', '.join(missing[:3])})"
        )
    encoder.load_state_dict(matched, strict=False)


def _candidates(key: str) -> Iterator[str]:
    """Names ``key`` may have in the encoder: itself, with smp's ``model.`` prefix added or
    removed, and without a whole model's ``module.``, ``net.``, ``encoder.`` prefixes."""
    yield key
    stripped = key
    while True:
        for prefix in ("module.", "net.", "encoder."):
            if stripped.startswith(prefix):
                stripped = stripped[len(prefix) :]
                break
        else:
            break
    for base in dict.fromkeys((key, stripped)):
        yield base
        yield base.removeprefix("model.")
        yield f"model.{base}"


def align_keys(tensors: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The file's tensors under the encoder's key names (those it can name); a key the file
    holds verbatim wins over one reached by adding or removing a prefix."""
    matched = {k: v for k, v in tensors.items() if k in own}
    for key, value in tensors.items():
        if key in own:
            continue
        name = next((c for c in _candidates(key) if c in own and c not in matched), None)
        if name is not None:
            matched[name] = value
    return matched


# ---------------------------------------------------------------------------------------------
# efficientnet_pytorch -> timm EfficientNet names

#: Stem: efficientnet_pytorch's name -> timm's.
_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1"}
#: A depthwise-separable block (no expand conv; timm's DepthwiseSeparableConv).
_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
#: An inverted-residual block (timm's InvertedResidual).
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.([^.]+)\.(.+)")
_TIMM_BLOCK = re.compile(r"(.*?\bblocks\.\d+\.\d+\.)")


def is_efficientnet_pytorch(tensors: Mapping[str, Tensor]) -> bool:
    """Whether the keys are ``efficientnet_pytorch``'s (``_conv_stem.weight``, ``_blocks.N...``)."""
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in tensors)


def convert_efficientnet_pytorch(tensors: Mapping[str, Tensor], encoder_keys: list[str]) -> dict[str, Tensor]:
    """Rename ``efficientnet_pytorch`` keys to the encoder's timm EfficientNet keys: its n-th
    block is the encoder's n-th ``blocks.S.I`` in module order. Keys with no counterpart (the
    head: ``_conv_head``, ``_bn1``, ``_fc``; blocks past the encoder's) keep their names."""
    blocks = list(dict.fromkeys(m.group(1) for k in encoder_keys if (m := _TIMM_BLOCK.match(k))))
    stem = next((k[: -len("conv_stem.weight")] for k in encoder_keys if k.endswith("conv_stem.weight")), "")
    expanded = {
        int(m.group(1)) for k in tensors if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"
    }
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        out[_timm_key(key, blocks, stem, expanded)] = value
    return out


def _timm_key(key: str, blocks: list[str], stem: str, expanded: set[int]) -> str:
    """One ``efficientnet_pytorch`` key's timm name (``key`` itself where there is none)."""
    module, _, rest = key.partition(".")
    if module in _STEM:
        return f"{stem}{_STEM[module]}.{rest}"
    match = _BLOCK_KEY.match(key)
    if match is None:
        return key
    index, part, param = int(match.group(1)), match.group(2), match.group(3)
    names = _INVERTED if index in expanded else _SEPARABLE
    if index >= len(blocks) or part not in names:
        return key
    return f"{blocks[index]}{names[part]}.{param}"
