"""A Tune trial retried after its host was lost: its run directory's lease is still the lost
host's, fresh for up to lock.STALE_AFTER_S after the loss (tests/test_hosts.py runs the whole
sweep on namespace hosts; this is the lease rule alone, on a local run directory)."""

from __future__ import annotations

import time

import pytest

from raylm import lock


def test_a_retried_trial_waits_for_a_lost_hosts_lease_to_go_stale_and_then_takes_the_run_directory(tmp_path):
    """The lease of a process on another host (a host that crashed a few seconds ago) blocks the
    run directory at once (LockHeld); `wait_for_lost_holder` returns once the lease is stale, and
    the retry then takes the lock instead of failing."""
    from raylm.ray.tune import wait_for_lost_holder

    run_dir = tmp_path / "runs" / "trial_00001"
    run_dir.mkdir(parents=True)
    lost = lock.Lease(host="lost-host", pid=4242, started="2026-12-07T20:00:00Z",
                      heartbeat=time.time() - lock.STALE_AFTER_S + 2, token="0" * 16, boot_id="lost-boot/1")
    (run_dir / lock.LOCK_FILE).write_bytes(lost.to_bytes())
    with pytest.raises(lock.LockHeld, match="lost-host pid 4242"):
        lock.check_free(run_dir, "trial run directory")

    wait_for_lost_holder(run_dir)
    with lock.acquire(run_dir, "trial run directory"):
        assert lock.Lease.from_bytes((run_dir / lock.LOCK_FILE).read_bytes()).host != "lost-host"
