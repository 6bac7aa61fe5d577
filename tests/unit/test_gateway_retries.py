"""The Gateway resends a model call that a dying replica dropped, a bounded number of times."""

import asyncio

import pytest
from ray.exceptions import ActorDiedError

from serve.bodies import ApiError
from serve.gateway import call_with_retries


def flaky(failures: int, error=ActorDiedError):
    calls = []

    async def call():
        calls.append(1)
        if len(calls) <= failures:
            raise error()
        return "edited"
    return call, calls


def test_a_call_lost_with_its_replica_is_sent_again():
    call, calls = flaky(2)
    assert asyncio.run(call_with_retries(call, "edit", retries=3, backoff_s=0.01)) == "edited"
    assert len(calls) == 3


def test_retries_are_bounded_and_end_in_a_503():
    call, calls = flaky(10)
    with pytest.raises(ApiError) as raised:
        asyncio.run(call_with_retries(call, "edit", retries=2, backoff_s=0.01))
    assert raised.value.status == 503 and "failed 3 times during edit" in raised.value.message and len(calls) == 3


def test_other_errors_are_not_retried():
    call, calls = flaky(1, error=lambda: ValueError("bad prompt"))
    with pytest.raises(ValueError):
        asyncio.run(call_with_retries(call, "edit", retries=3, backoff_s=0.01))
    assert len(calls) == 1
