"""The store behind latent_id on the stack's S3: a handle's lifetime is enforced on read and by the sweep."""

from __future__ import annotations

import time

import pytest
import torch

from serve.latents import LatentError, LatentStore


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(stack_env):
    clock = Clock()
    prefix = f"s3://{stack_env.bucket}/tests/latents-{time.time_ns()}"
    return LatentStore(prefix, ttl_s=600, sweep_every_s=60, clock=clock), clock


def test_a_handle_reads_back_until_its_ttl_then_is_gone(store):
    store, clock = store
    latents = torch.randn(1, 4, 8, 8)
    latent_id = store.put(latents, {"version": "3", "width": 40})
    got, meta = store.get(latent_id)
    assert torch.equal(got, latents) and meta == {"version": "3", "width": "40"}
    assert store.put(latents, {"version": "3", "width": 40}) == latent_id  # content-addressed
    clock.now += 601
    with pytest.raises(LatentError, match="expired") as info:
        store.get(latent_id)
    assert info.value.status == 404
    clock.now -= 601  # even back in time, the expired read deleted the object
    with pytest.raises(LatentError, match="unknown"):
        store.get(latent_id)


def test_the_sweep_deletes_only_expired_handles(stack_env):
    """S3 keeps real modification times, so this test waits for real: a 2 s TTL, 2.5 s apart."""
    store = LatentStore(f"s3://{stack_env.bucket}/tests/latents-{time.time_ns()}", ttl_s=2)
    old = store.put(torch.zeros(1, 4, 8, 8), {"version": "1"})
    time.sleep(2.5)
    young = store.put(torch.ones(1, 4, 8, 8), {"version": "1"})
    assert store.sweep() == 1
    assert store.get(young)[0].sum() == 4 * 8 * 8
    long_lived = LatentStore(store.prefix, ttl_s=10_000)  # the object is gone, not merely refused
    with pytest.raises(LatentError, match="unknown"):
        long_lived.get(old)


def test_sweeps_are_spaced_by_sweep_every_s(store):
    store, clock = store
    assert store.sweep_if_due() == 0  # the first call sweeps
    clock.now += 59
    assert store.sweep_if_due() is None
    clock.now += 2
    assert store.sweep_if_due() == 0


def test_delete_and_malformed_ids(store):
    store, _ = store
    latent_id = store.put(torch.zeros(1, 4, 8, 8), {})
    store.delete(latent_id)
    with pytest.raises(LatentError) as gone:
        store.delete(latent_id)
    assert gone.value.status == 404
    with pytest.raises(LatentError) as bad:
        store.get("xyz")
    assert bad.value.status == 422
    with pytest.raises(ValueError, match="latent_ttl_s"):
        LatentStore(store.prefix, ttl_s=0)
