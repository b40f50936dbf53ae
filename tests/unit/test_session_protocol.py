"""upload/session.py's interfaces, held against the real classes and the tests' fakes: the
real ones implement every member with the same parameters, a fake the members it has."""

from __future__ import annotations

import inspect

import pytest
from test_bulk import FakeBulk, FakeStorage
from test_worker import FakeRucio

from dac_upload.rucio.client import RucioIO
from dac_upload.rucio.storage import Storage
from dac_upload.upload.session import CopyTarget, RucioSession


def _members(protocol: type) -> dict[str, list[str] | None]:
    """Each method's parameter names; None for a property (any attribute will do)."""
    return {name: None if isinstance(fn, property) else list(inspect.signature(fn).parameters)
            for name, fn in vars(protocol).items()
            if (callable(fn) or isinstance(fn, property)) and not name.startswith("_")}


def _params(obj: object, name: str) -> list[str] | None:
    member = inspect.getattr_static(obj, name)
    return None if isinstance(member, property) else list(
        inspect.signature(getattr(obj, name)).parameters)


@pytest.mark.parametrize(("protocol", "real"), [(RucioSession, RucioIO), (CopyTarget, Storage)])
def test_the_real_class_implements_the_protocol(protocol: type, real: type) -> None:
    for name, params in _members(protocol).items():
        assert _params(real, name) == params, name


@pytest.mark.parametrize(("protocol", "fake"), [(RucioSession, FakeRucio),
                                                (RucioSession, FakeBulk),
                                                (CopyTarget, FakeStorage)])
def test_a_fake_has_the_protocols_signatures(protocol: type, fake: type) -> None:
    members = _members(protocol)
    shared = [name for name, params in members.items()
              if params is not None and callable(getattr(fake, name, None))]
    assert shared, fake
    for name in shared:
        assert _params(fake, name) == members[name], name
