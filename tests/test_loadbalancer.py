"""Body servers behind HAProxy (deploy/haproxy.cfg, as shipped): health checks, least connections,
TLS passed through, and a server killed mid-generation that the device replays past.

HAProxy comes from Debian (./scripts/haproxy.sh, part of the test command); a missing haproxy
fails this module instead of skipping it, so CI cannot pass without the proxy."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.errors import AuthError
from scripts.failover import Cluster, haproxy_command, run_trial, unsplit_tokens

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2030, 30]])
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def runtime(llama) -> SplitRuntime:
    return SplitRuntime.load(llama, (2, 2))


@pytest.fixture(scope="module")
def expected(llama, runtime) -> list[int]:
    tokens = unsplit_tokens(llama, IDS, NEW_TOKENS, runtime.eos_ids)
    assert len(tokens) > 4, "the kill must land mid-generation"
    return tokens


@pytest.fixture(scope="module")
def cluster(llama, tmp_path_factory):
    haproxy_command(Cluster.config)  # raises (never skips) when haproxy is missing
    with Cluster(llama, tmp_path_factory.mktemp("lb"), start_timeout=240) as running:
        yield running


def test_health_checks_pass_on_every_server(cluster):
    states = cluster.server_states()
    assert set(states) == set(cluster.names) and len(states) >= 2
    assert all(status == "UP" and check == "L7OK" for status, check, _ in states.values()), states


def test_least_connections_spreads_devices(cluster, runtime):
    """Held connections, one per server: leastconn never stacks a second device on a busy server."""
    bodies = [cluster.device_body(runtime) for _ in cluster.names]
    try:
        for body in bodies:
            body.frame_positions()  # connects (HELLO/WELCOME) and holds the connection
        assert sorted(cluster.sessions_active(i) for i in range(len(cluster.servers))) == [1.0] * len(cluster.servers)
    finally:
        for body in bodies:
            body.close()


def test_uninterrupted_generation_through_the_proxy(cluster, runtime, expected):
    body = cluster.device_body(runtime)
    try:
        result = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=NEW_TOKENS))
    finally:
        body.close()
    assert result.token_ids == [expected] and body.reconnects == 0


def test_the_token_reaches_the_servers_through_the_proxy(cluster, runtime):
    """TLS passes through HAProxy: the servers themselves check the bearer token."""
    body = cluster.device_body(runtime, token="not-the-token-not-the-token")
    with pytest.raises(AuthError, match="401"):
        body.frame_positions()


def test_kill_the_server_mid_generation_and_the_output_is_identical(cluster, runtime, expected):
    trial = run_trial(cluster, runtime, IDS, NEW_TOKENS, kill_after=4)
    assert trial.tokens == expected
    assert trial.reconnects >= 1
    assert trial.took_over not in ("-", trial.killed)  # the session now lives on another server
    cluster.wait_states({trial.killed: "DOWN"}, 30)  # HAProxy took it out of the rotation
    survivors = [i for i, name in enumerate(cluster.names) if name != trial.killed]
    assert all(cluster.servers[i].returncode is None for i in survivors)
