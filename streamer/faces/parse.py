"""Face-parsing paste masks (``--mask parse``), with facexlib's ParseNet.

GPEN pastes restored faces through a face-parsing mask instead of a rectangle, so hair, ears
and neck follow the face and the background around it stays untouched (GPEN #31). We run
ParseNet (19 CelebAMask-HQ classes, 512x512) on the aligned *input* crop, in the decoder
before the crop is dispatched (so occluders in front of the face stay out of the mask), and
keep every class but background, hat and cloth, as GPEN does; then, as GPEN, zero a border
(26 px at 512) and blur twice (Gaussian, sigma 4 at 512).

ParseNet costs ~3 s per face on a 2-core CPU; it runs on the decoder's device (the same as the
detector: CUDA when available).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

from configs.errors import InputError
from gpen.checkpoint import CheckpointError, read_state_dict
from gpen.weights import WeightsError, locate

PARSE_SIZE = 512
EXCLUDED_CLASSES = (0, 14, 18)  # background, hat, cloth
BORDER_AT_512 = 26
SIGMA_AT_512 = 4.0


class ParserUnavailable(InputError):
    """The parsing network cannot run (missing or bad weights)."""


def mask_from_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """float32 size x size paste mask from a PARSE_SIZE^2 class map."""
    mask = (~np.isin(labels, EXCLUDED_CLASSES)).astype(np.float32)
    border = BORDER_AT_512 * PARSE_SIZE // 512
    mask[:border], mask[-border:], mask[:, :border], mask[:, -border:] = 0, 0, 0, 0
    sigma = SIGMA_AT_512 * PARSE_SIZE / 512
    for _ in range(2):
        mask = cv2.GaussianBlur(mask, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    if size != PARSE_SIZE:
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(mask, 0.0, 1.0)


class FaceParser:
    def __init__(self, device: torch.device, weights: str | Path | None = None, allow_download: bool = True):
        try:
            weights = locate("parsenet", weights, allow_download=allow_download)
            state = read_state_dict(weights)
        except (WeightsError, CheckpointError) as exc:
            raise ParserUnavailable(str(exc)) from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from facexlib.parsing.parsenet import ParseNet

            net = ParseNet(in_size=PARSE_SIZE, out_size=PARSE_SIZE, parsing_ch=19)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ParserUnavailable(f"{weights} is not a ParseNet checkpoint: {str(exc).splitlines()[0]}") from None
        self.net = net.to(device).eval()
        self.device = device

    @torch.inference_mode()
    def masks(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """One paste mask per aligned uint8 RGB crop, in one batch."""
        if not crops:
            return []
        size = crops[0].shape[0]
        batch = np.stack([c if size == PARSE_SIZE else cv2.resize(c, (PARSE_SIZE, PARSE_SIZE),
                                                                  interpolation=cv2.INTER_LINEAR) for c in crops])
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1  # RGB in [-1, 1]
        logits = self.net(x)[0]
        labels = logits.argmax(dim=1).cpu().numpy()
        return [mask_from_labels(lab, size) for lab in labels]
