"""Every picture names its panels: the band of titles above the columns."""

import numpy as np
from PIL import Image

from emfm.pictures import LINE, titled


def test_each_column_gets_its_title_above_an_unchanged_picture() -> None:
    panels = Image.fromarray(np.full((40, 300), 128, np.uint8))          # three 100-px columns, mid grey
    out = titled(panels, ["raw", "a title far too long to fit in its column", "truth"], heading="step 7")
    band = np.asarray(out)[: 2 * LINE]
    assert out.size == (300, 40 + 2 * LINE) and np.all(np.asarray(out)[2 * LINE:] == 128)
    assert (band[:LINE, :100] < 100).any()                                   # the heading, from the left
    for column in range(3):                                                  # each title within its own column
        assert (band[LINE:, column * 100 + 2: column * 100 + 98] < 100).any()
    assert (band[LINE:, 98:102] > 250).all() and (band[LINE:, 197:203] > 250).all()  # the long one cut short


def test_no_heading_means_one_line_and_colour_pictures_stay_colour() -> None:
    out = titled(Image.new("RGB", (64, 16), (0, 255, 0)), ["raw", "probs"])
    assert out.mode == "RGB" and out.size == (64, 16 + LINE)
    assert np.asarray(out)[LINE:].tolist() == np.asarray(Image.new("RGB", (64, 16), (0, 255, 0))).tolist()
