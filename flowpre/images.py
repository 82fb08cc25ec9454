"""Sample grids a person can read: (B, C, H, W) tensors in [-1, 1] to labelled PNGs.

A grid is rows of images (one row per step count, or more samples of the same columns)
under a header naming the columns (class names, prompts) with each row's label on its
left and a title line above (what was sampled, at how many steps). Small images are
upscaled nearest-neighbour until a cell is at least MIN_CELL pixels: a 28-pixel sample is
unreadable at its own size, and nearest shows the pixels the model made without the
smoothing a bilinear resize would flatter them with.
"""
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 64
PAD = 2
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


def to_uint8(x):
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def upscale_factor(size, min_cell=MIN_CELL):
    """The smallest whole factor that makes `size` pixels at least `min_cell`."""
    return max(1, math.ceil(min_cell / size))


def _font(size):
    try:  # Pillow >= 10.1 ships a scalable default font; older ones only a fixed 11 px bitmap
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_width(draw, text, font):
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def wrap(text, width, font, max_lines=3):
    """Greedy word wrap into at most `max_lines` lines of `width` pixels; the last line
    ends in an ellipsis when text is left over (a long prompt is cut, never overflows)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line = [], ""
    for word in str(text).split():
        candidate = f"{line} {word}".strip()
        if _text_width(draw, candidate, font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines, last = lines[:max_lines], lines[max_lines - 1]
        while last and _text_width(draw, last + "…", font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "…"
    # a single word wider than the cell is cut too
    fitted = []
    for item in lines:
        while len(item) > 1 and _text_width(draw, item, font) > width:
            item = item[:-2] + "…"
        fitted.append(item)
    return fitted


def labeled_grid(rows, col_labels=None, row_labels=None, title=None, min_cell=MIN_CELL, font_size=11):
    """rows: a list of (B, C, H, W) tensors in [-1, 1], each one row of the grid (B columns;
    a row longer than the others is an error). col_labels: B strings for the header,
    row_labels: one per row, title: one line above. Returns a PIL RGB image."""
    if not rows:
        raise ValueError("labeled_grid: no rows to draw")
    ncol = rows[0].shape[0]
    if any(r.shape[0] > ncol for r in rows):
        raise ValueError(f"labeled_grid: rows hold {[r.shape[0] for r in rows]} images; none may exceed the first")
    if col_labels is not None and len(col_labels) != ncol:
        raise ValueError(f"labeled_grid: {len(col_labels)} column labels for {ncol} columns")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"labeled_grid: {len(row_labels)} row labels for {len(rows)} rows")
    if rows[0].shape[1] not in (1, 3):  # latents must be decoded first: never show 3 of 4 channels
        raise ValueError(f"labeled_grid: images need 1 or 3 channels, got {rows[0].shape[1]}")
    H, W = rows[0].shape[-2:]
    factor = upscale_factor(min(H, W), min_cell)
    cell_h, cell_w = H * factor, W * factor
    font = _font(font_size)
    line_h = font_size + 3
    header = [wrap(t, cell_w, font) for t in col_labels] if col_labels is not None else []
    header_h = (max(map(len, header)) * line_h + PAD) if header else 0
    label_w = 0
    if row_labels is not None:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = max(_text_width(probe, t, font) for t in row_labels) + 3 * PAD
    title_h = line_h + PAD if title else 0
    width = label_w + PAD + ncol * (cell_w + PAD)
    height = title_h + header_h + PAD + len(rows) * (cell_h + PAD)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD), wrap(title, width - 2 * PAD, font, max_lines=1)[0], fill=INK, font=font)
    for c, lines in enumerate(header):
        x0 = label_w + PAD + c * (cell_w + PAD)
        for i, line in enumerate(lines):
            draw.text((x0, title_h + i * line_h), line, fill=INK, font=font)
    top = title_h + header_h + PAD
    for r, row in enumerate(rows):
        y0 = top + r * (cell_h + PAD)
        if row_labels is not None:
            draw.text((PAD, y0 + cell_h // 2 - line_h // 2), row_labels[r], fill=INK, font=font)
        for c, img in enumerate(to_uint8(row)):
            cell = img.repeat(factor, axis=0).repeat(factor, axis=1)
            cell = np.repeat(cell, 3, axis=2) if cell.shape[2] == 1 else cell
            canvas.paste(Image.fromarray(cell), (label_w + PAD + c * (cell_w + PAD), y0))
    return canvas


def steps_label(steps):
    return f"{steps} step" + ("" if steps == 1 else "s")


def save_labeled_grid(path, rows, col_labels=None, row_labels=None, title=None, min_cell=MIN_CELL):
    labeled_grid(rows, col_labels, row_labels, title, min_cell).save(path)


def class_columns(num_classes, class_names=None, max_columns=10):
    """The classes a sample grid shows, one per column, and their names: every class when
    there are at most max_columns, else max_columns spread evenly over the labels (ImageNet's
    first ten are all fish)."""
    if num_classes <= max_columns:
        ids = list(range(num_classes))
    else:
        ids = [i * num_classes // max_columns for i in range(max_columns)]
    names = list(class_names or [])
    return ids, [names[i] if i < len(names) else f"class {i}" for i in ids]
