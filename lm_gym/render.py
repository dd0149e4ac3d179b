"""Drawing an episode's text as an RGB frame (``render_mode="rgb_array"``), so video recorders can show it."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FRAME_SIZE = (640, 360)  # width, height in pixels
MARGIN = 8  # pixels
LINE_HEIGHT = 14  # pixels, for PIL's default bitmap font
CHARS_PER_LINE = 100


def text_frame(text: str, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """``text`` wrapped and drawn black on white: a (height, width, 3) uint8 array.

    Lines that do not fit keep the latest ones (the end of the dialogue is what changes between frames).
    """
    width, height = size
    lines = [piece for line in text.splitlines() or [""] for piece in textwrap.wrap(line, CHARS_PER_LINE) or [""]]
    lines = lines[-max(1, (height - 2 * MARGIN) // LINE_HEIGHT):]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for number, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + number * LINE_HEIGHT), line, fill="black", font=font)
    return np.asarray(image, dtype=np.uint8)
