"""The registry's settings refuse factors whose verdicts the fold would refuse."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from registry.protocol import MIN_LATE_FACTOR, MIN_TIMEOUT_FACTOR
from registry.server.settings import RegistrySettings


def test_defaults_claim_at_least_what_the_fold_requires() -> None:
    s = RegistrySettings()
    assert s.timeout_factor >= MIN_TIMEOUT_FACTOR and s.late_factor >= MIN_LATE_FACTOR


@pytest.mark.parametrize("factor", [1.0, MIN_TIMEOUT_FACTOR - 0.01])
def test_timeout_factor_below_the_contracts_minimum_is_refused(factor: float) -> None:
    with pytest.raises(ValidationError, match="timeout_factor"):
        RegistrySettings(timeout_factor=factor)


@pytest.mark.parametrize("factor", [0.5, 1.0, MIN_LATE_FACTOR - 0.01])
def test_late_factor_below_the_contracts_minimum_is_refused(factor: float) -> None:
    with pytest.raises(ValidationError, match="late_factor must be 0"):
        RegistrySettings(late_factor=factor)


def test_late_factor_zero_still_turns_late_notices_off() -> None:
    assert RegistrySettings(late_factor=0.0).late_factor == 0.0
    assert RegistrySettings(late_factor=MIN_LATE_FACTOR).late_factor == MIN_LATE_FACTOR
