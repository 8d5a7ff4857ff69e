"""The failed-login throttle, with a fake clock."""

from __future__ import annotations

from imapproxy.throttle import MAX_DELAY_S, WINDOW_S, LoginThrottle


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_per_user_and_per_address_and_are_forgotten() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(2, clock)
    assert [throttle.failed(b"alice", "10.0.0.1") for _ in range(3)] == [2, 4, 8]
    assert throttle.failed(b"bob", "10.0.0.1") == 16  # the same address keeps counting
    assert throttle.failed(b"alice", "10.0.0.2") == 16  # the same user from elsewhere too
    assert throttle.failed(b"carol", "10.0.0.3") == 2  # others start fresh
    for _ in range(20):
        throttle.failed(b"alice", "10.0.0.1")
    assert throttle.failed(b"alice", "10.0.0.1") == MAX_DELAY_S
    clock.now += WINDOW_S + 1
    assert throttle.failed(b"alice", "10.0.0.1") == 2


def test_zero_turns_it_off() -> None:
    assert LoginThrottle(0, FakeClock()).failed(b"alice", "10.0.0.1") == 0
