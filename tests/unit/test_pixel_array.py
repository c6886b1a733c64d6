"""service.dataplane.pixel_array: np.asarray's array of JSON's pixel lists, made an
element at a time, or None where np.asarray's own reading is needed."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.dataplane import pixel_array

scalars = (
    st.integers(0, 255)
    | st.floats(0, 255, allow_nan=False)
    | st.sampled_from([True, None, "x", -1, 2**63, 2**70, float("nan")])
)


@st.composite
def nested(draw: Any) -> Any:
    """Lists of lists of scalars, mostly rectangular, at times not."""
    shape = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    uniform = draw(st.sampled_from([st.integers(0, 255), st.floats(0, 255, allow_nan=False)]))
    odd = draw(st.booleans())

    def build(dims: list[int]) -> Any:
        if not dims:
            return draw(scalars if odd and draw(st.integers(0, 9)) == 0 else uniform)
        items = [build(dims[1:]) for _ in range(dims[0])]
        if odd and len(items) > 1 and draw(st.integers(0, 19)) == 0:
            items.pop()  # ragged
        return items

    return build(shape)


@settings(deadline=None, max_examples=400)
@given(nested())
def test_the_array_is_np_asarrays_or_none(value: Any) -> None:
    try:
        whole = np.asarray(value)
    except ValueError:
        whole = None
    try:
        made = pixel_array(value)
    except ValueError:
        assert whole is None  # ragged either way
        return
    if made is None:
        return
    assert whole is not None
    assert made.dtype == whole.dtype and made.shape == whole.shape
    np.testing.assert_array_equal(made, whole)


def test_pixels_of_numbers_are_arrays_and_others_are_left_to_np_asarray() -> None:
    image = [[[1, 2, 3]] * 4] * 4
    assert pixel_array([image, image]).shape == (2, 4, 4, 3)  # type: ignore[union-attr]
    assert pixel_array([1.5, 2]).dtype == np.float64  # type: ignore[union-attr]
    assert pixel_array([image, [[[1.5, 2, 3]] * 4] * 4]) is None  # int64 beside float64
    assert pixel_array([[True, False]]) is None
    assert pixel_array([[1, None]]) is None
    assert pixel_array([[1, "x"]]) is None
    assert pixel_array([]) is None
    assert pixel_array(np.zeros(3)) is None  # arrays already
