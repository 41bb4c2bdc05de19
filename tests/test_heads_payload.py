"""Payloads: what crosses is typed and checked; non-finite or misshaped ones are refused."""

import numpy as np
import pytest

from fedad.heads.payload import Payload, PayloadError, payload_from_record
from fedad.payloads import digest

SIZES = {"K": 4, "D": 6}


def prototypes(k=4, d=6, count=100, fill=None):
    values = np.random.default_rng(0).normal(size=(k, d)).astype(np.float32)
    if fill is not None:
        values[1, 2] = fill
    return Payload("prototypes", {"prototypes": values, "counts": np.full(k, 25.0, np.float32)},
                   count)


def test_a_valid_payload_round_trips_through_a_message():
    sent = prototypes()
    got = payload_from_record(sent.to_record(), "prototypes", SIZES)
    assert got.count == 100 and digest(got.arrays) == digest(sent.arrays)
    np.testing.assert_array_equal(got.arrays["prototypes"], sent.arrays["prototypes"])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_prototypes_are_refused(value):
    with pytest.raises(PayloadError, match="non-finite"):
        payload_from_record(prototypes(fill=value).to_record(), "prototypes", SIZES)


@pytest.mark.parametrize("k, d", [(5, 6), (4, 7), (1, 6)])
def test_misshaped_prototypes_are_refused(k, d):
    with pytest.raises(PayloadError, match="shape"):
        payload_from_record(prototypes(k, d).to_record(), "prototypes", SIZES)


def test_wrong_kind_missing_or_extra_arrays_and_empty_counts_are_refused():
    with pytest.raises(PayloadError, match="kind"):
        payload_from_record(prototypes().to_record(), "mixture", SIZES)
    extra = prototypes()
    extra.arrays["features"] = np.zeros((1000, 6), np.float32)  # raw patches must not cross
    with pytest.raises(PayloadError, match="arrays"):
        payload_from_record(extra.to_record(), "prototypes", SIZES)
    with pytest.raises(PayloadError, match="num-examples"):
        payload_from_record(prototypes(count=0).to_record(), "prototypes", SIZES)
    integer = Payload("prototypes", {"prototypes": np.zeros((4, 6), np.int64),
                                     "counts": np.ones(4, np.float32)}, 3)
    with pytest.raises(PayloadError, match="non-float"):
        payload_from_record(integer.to_record(), "prototypes", SIZES)
