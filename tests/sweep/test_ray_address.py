"""An unreachable Ray address is one clear error within seconds, not minutes of retries."""
import socket
import time

import pytest

from steplaw.errors import UserError
from steplaw.sweep.ray_executor import _check_ray_reachable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


def test_dead_address_fails_fast():
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot reach Ray"):
        _check_ray_reachable(f"127.0.0.1:{_closed_port()}", timeout_s=2.0)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("address", ["127.0.0.1", "host:port"])
def test_malformed_address(address):
    with pytest.raises(UserError, match="expected HOST:PORT"):
        _check_ray_reachable(address)


@pytest.mark.parametrize("address", [None, "auto", "ray://example:10001"])
def test_addresses_left_to_ray(address):
    _check_ray_reachable(address)  # no check, no error


def test_listening_address_passes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        _check_ray_reachable(f"127.0.0.1:{server.getsockname()[1]}")
