"""Input checks of a training or evaluation batch, before any chunk runs."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from chunkflow.runtime.loss import IGNORE_INDEX


def prepare_batch(batch, *, vocab_size: int, device: torch.device
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Validate a batch (a list of 1-D token tensors, or of dicts with ``input_ids`` and
    optional unshifted ``labels``, or a 2-D tensor); return input_ids and labels per sequence
    on ``device``. Errors name the item, the position and what would be valid."""
    if isinstance(batch, torch.Tensor) and batch.dim() == 2:
        batch = list(batch)
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)) or len(batch) == 0:
        raise ValueError(f"batch must be a non-empty list of 1-D token tensors or of dicts "
                         f"with 'input_ids' (and optional 'labels'); got {_describe(batch)}")
    vocab = vocab_size
    ids_list, labels_list = [], []
    for i, item in enumerate(batch):
        labels = None
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise ValueError(f"batch[{i}] has keys {sorted(item)}; 'input_ids' is required")
            ids, labels = item["input_ids"], item.get("labels")
        else:
            ids = item
        ids = _as_token_tensor(ids, f"batch[{i}] input_ids")
        if ids.numel() == 0:
            raise ValueError(f"batch[{i}] is an empty sequence; every sequence needs at "
                             f"least one token")
        _check_range(ids, vocab, f"batch[{i}] input_ids", allow_ignore=False)
        if labels is None:
            labels = ids
        else:
            labels = _as_token_tensor(labels, f"batch[{i}] labels")
            if labels.shape != ids.shape:
                raise ValueError(f"batch[{i}]: labels shape {tuple(labels.shape)} differs from "
                                 f"input_ids shape {tuple(ids.shape)}; labels are unshifted "
                                 f"and as long as input_ids")
            _check_range(labels, vocab, f"batch[{i}] labels", allow_ignore=True)
        ids_list.append(ids.to(device))
        labels_list.append(labels.to(device))
    return ids_list, labels_list


def _describe(x: Any) -> str:
    return f"{type(x).__name__} of length {len(x)}" if hasattr(x, "__len__") else repr(x)


def _as_token_tensor(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what} is not a sequence of token ids: {e}") from None
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{what} has dtype {x.dtype}; token ids must be integers (torch.long)")
    if x.dim() != 1:
        raise ValueError(f"{what} has shape {tuple(x.shape)}; each sequence must be 1-D")
    return x.long()


def _check_range(x: torch.Tensor, vocab_size: int, what: str, *, allow_ignore: bool) -> None:
    bad = (x < 0) | (x >= vocab_size)
    if allow_ignore:
        bad &= x != IGNORE_INDEX
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        valid = f"0..{vocab_size - 1}" + (f" or {IGNORE_INDEX}" if allow_ignore else "")
        raise ValueError(f"{what}: token id {int(x[pos])} at position {pos} is out of range; "
                         f"valid ids are {valid} (vocab_size={vocab_size})")
