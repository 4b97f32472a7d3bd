"""Engine settings are declared once (shared.bus.settings); every service reads them alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest

from services.admission.config import parse_args as admission_args
from services.binder.__main__ import parse_args as binder_args
from services.binder.service import BinderOptions
from services.forecast.config import ForecastOptions
from services.forecast.config import parse_args as forecast_args
from services.packer.__main__ import parse_args as packer_args
from services.packer.service import PackerOptions
from services.resolver.__main__ import parse_args as resolver_args
from services.resolver.service import ResolverOptions
from shared.bus.config import ServiceConfig
from shared.bus.settings import KNOBS
from shared.engine.state import Settings

CUSTOM = {
    "JOBTREE_DEFAULT_DURATION_HOURS": "6",
    "JOBTREE_SPARE_FACTOR": "0.25",
    "JOBTREE_CONSERVATIVE_LEAD_HOURS": "3",
    "JOBTREE_HORIZON_DAYS": "7",
    "JOBTREE_NODE_GRACE_SECONDS": "12",
    "JOBTREE_MISSING_POD_GRACE_SECONDS": "45",
}
EXPECTED = Settings(
    default_duration=timedelta(hours=6),
    spare_factor=0.25,
    conservative_lead=timedelta(hours=3),
    horizon=timedelta(days=7),
    node_grace=timedelta(seconds=12),
    missing_pod_grace=timedelta(seconds=45),
)


def admission(argv: list[str]) -> Settings:
    return admission_args(argv).settings


Options = PackerOptions | ForecastOptions | ResolverOptions | BinderOptions


def options_of(
    parse: Callable[[list[str]], tuple[ServiceConfig, Options]],
) -> Callable[[list[str]], Settings]:
    def settings(argv: list[str]) -> Settings:
        return parse(argv)[1].settings

    return settings


SERVICES: dict[str, Callable[[list[str]], Settings]] = {
    "admission": admission,
    "packer": options_of(packer_args),
    "forecast": options_of(forecast_args),
    "resolver": options_of(resolver_args),
    "binder": options_of(binder_args),
}


def test_every_setting_has_one_knob() -> None:
    assert sorted(k.field for k in KNOBS) == sorted(Settings.__dataclass_fields__)
    assert sorted(k.env for k in KNOBS) == sorted(CUSTOM)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_defaults_are_the_settings_defaults(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CUSTOM:
        monkeypatch.delenv(name, raising=False)
    assert SERVICES[service]([]) == Settings()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_one_environment_configures_every_service_alike(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CUSTOM.items():
        monkeypatch.setenv(name, value)
    assert SERVICES[service]([]) == EXPECTED


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_a_flag_wins_over_the_environment(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBTREE_SPARE_FACTOR", "0.25")
    got = SERVICES[service](["--spare-factor", "0.5", "--default-duration-hours", "1.5"])
    assert got.spare_factor == 0.5
    assert got.default_duration == timedelta(hours=1.5)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("JOBTREE_SPARE_FACTOR", "1.5", "must be between 0 and 1, got 1.5"),
        ("JOBTREE_DEFAULT_DURATION_HOURS", "0", "must be positive, got 0"),
        ("JOBTREE_NODE_GRACE_SECONDS", "soon", "not a number: 'soon'"),
    ],
)
def test_a_bad_value_is_refused_naming_the_flag_and_the_variable(
    variable: str,
    value: str,
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit):
        SERVICES["binder"]([])
    err = capsys.readouterr().err
    flag = next(k.flag for k in KNOBS if k.env == variable)
    assert f"argument {flag}: {says}" in err and f"${variable}" in err, err
