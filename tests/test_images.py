"""Readable sample grids: upscaled cells, a header naming the columns, row labels, a title."""
import numpy as np
import pytest
import torch
from PIL import Image

from flowpre.images import MIN_CELL, PAD, class_columns, labeled_grid, upscale_factor, wrap, _font


def rows_of(n_rows, ncol, channels, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(ncol, channels, size, size, generator=g) * 2 - 1 for _ in range(n_rows)]


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 13), (3, 72)])
def test_cells_are_nearest_upscaled_copies_of_the_images(channels, size):
    rows = rows_of(2, 3, channels, size)
    img = np.asarray(labeled_grid(rows))
    f = upscale_factor(size)
    assert size * f >= MIN_CELL and (f == 1 or size * (f - 1) < MIN_CELL)
    cell = size * f
    assert img.shape == (PAD + 2 * (cell + PAD), PAD + 3 * (cell + PAD), 3)
    for r in range(2):
        for c in range(3):
            y, x = PAD + r * (cell + PAD), PAD + c * (cell + PAD)
            got = img[y:y + cell:f, x:x + cell:f]  # one pixel per source pixel
            want = ((rows[r][c].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(got, np.broadcast_to(want, got.shape))
            # nearest: every pixel of a block equals its top-left one
            block = img[y:y + f, x:x + f]
            assert (block == block[0, 0]).all()


def test_header_row_labels_and_title_are_drawn():
    rows = rows_of(3, 4, 1, 16)
    plain = labeled_grid(rows)
    labeled = labeled_grid(rows, col_labels=["T-shirt/top", "Trouser", "a very long prompt that wraps", "Bag"],
                           row_labels=["1 step", "4 steps", "32 steps"], title="step 100: slow EMA")
    w0, h0 = plain.size
    w1, h1 = labeled.size
    assert w1 > w0 and h1 > h0  # room for the row labels on the left, header and title above
    arr = np.asarray(labeled).astype(int)
    top = arr[:h1 - h0]  # header and title strip: white paper with dark ink
    assert (top.sum(-1) < 200).sum() > 50 and (top == 255).mean() > 0.5
    left = arr[h1 - h0:, :w1 - w0]  # row label strip
    assert (left.sum(-1) < 200).sum() > 30


def test_wrap_cuts_long_text_to_the_cell():
    font = _font(11)
    lines = wrap("an astronaut riding a horse on the moon in the style of a woodcut", 64, font)
    assert 1 < len(lines) <= 3 and lines[-1].endswith("…")
    assert wrap("Bag", 64, font) == ["Bag"]
    assert wrap("Supercalifragilisticexpialidocious", 40, font)[0].endswith("…")


def test_bad_grids_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="column labels"):
        labeled_grid(rows_of(1, 3, 1, 8), col_labels=["a", "b"])
    with pytest.raises(ValueError, match="row labels"):
        labeled_grid(rows_of(2, 3, 1, 8), row_labels=["a"])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        labeled_grid(rows_of(1, 3, 4, 8))  # an undecoded latent
    with pytest.raises(ValueError, match="no rows"):
        labeled_grid([])


def test_class_columns_spread_over_many_classes():
    assert class_columns(3, ["a", "b", "c"]) == ([0, 1, 2], ["a", "b", "c"])
    ids, names = class_columns(1000, None)
    assert ids == list(range(0, 1000, 100)) and names[1] == "class 100"
    ids, names = class_columns(12, [f"n{i}" for i in range(12)], max_columns=4)
    assert ids == [0, 3, 6, 9] and names == ["n0", "n3", "n6", "n9"]


def test_saved_grid_round_trips(tmp_path):
    from flowpre.images import save_labeled_grid
    path = tmp_path / "g_4steps.png"
    save_labeled_grid(path, rows_of(1, 2, 3, 32), ["x", "y"], ["4 steps"], title="t")
    assert Image.open(path).mode == "RGB"
