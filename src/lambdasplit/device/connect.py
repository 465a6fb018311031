"""One way to reach a body: a `BodyConfig` says where it is, `connect_body()` returns a BodyClient.

The CLI, gateway, UI, split diffusion and benchmarks all go through here, so a remote body and an
in-process one are configured the same way and take their defaults from `lambdasplit.defaults`.
In-process bodies with the same source share one scheduler (one copy of the weights), and every
`connect_body()` call opens its own session on it, exactly as devices share a server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lambdasplit import defaults
from lambdasplit.device.body import BodyClient
from lambdasplit.device.remote import RemoteBody
from lambdasplit.errors import LambdaSplitError
from lambdasplit.security import read_token
from lambdasplit.split.manifest import Manifest, PartManifest
from lambdasplit.wire.codec import Codec

if TYPE_CHECKING:
    from lambdasplit.engine.scheduler import BodyScheduler


@dataclass(frozen=True)
class BodyConfig:
    """Where the body runs and how to talk to it."""

    server: str | None = None  # ws:// or wss:// URL of `lambdasplit serve`; None: in this process
    token: str | None = None
    tls_ca: Path | None = None
    codec: Codec = Codec.FP32
    timeout: float = defaults.REPLY_TIMEOUT
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    reconnect_window: float = defaults.RECONNECT_WINDOW
    capture: bool = False  # record every frame (for audits and the UI's panel)
    # The in-process body (server is None): which model and split to load.
    source: str | None = None
    split: tuple[int, int] | None = None
    dtype: str | None = None
    device: str = defaults.DEVICE
    allow_shallow: bool = False

    @classmethod
    def from_options(cls, server: str | None, token_file: Path | None = None, **fields) -> BodyConfig:
        """A config from CLI options: the token is read (and checked) from its file."""
        return cls(server=server, token=read_token(token_file), **fields)


def check_in_process(source: str | None, decoys: int = 0) -> None:
    """Refuse, before anything loads, what a body in this process cannot run: an exported device
    part (it has no body; that runs on a server) or decoy rows beyond the in-process --max-batch."""
    if source is not None and Path(source).expanduser().is_dir():
        exported = PartManifest.read(Path(source).expanduser())
        if exported is not None and exported.role == "device":
            raise LambdaSplitError(
                f"{source} is an exported device part (head and tail only): its body runs on a server, so pass "
                "--server ws://HOST:PORT of `lambdasplit serve --part DIR/cloud`"
            )
    if decoys + 1 > defaults.MAX_BATCH:
        raise LambdaSplitError(
            f"--decoys {decoys}: {decoys + 1} rows exceed the {defaults.MAX_BATCH} rows the body in this process runs "
            f"per session; use --decoys {defaults.MAX_BATCH - 1} or fewer, or a --server started with a larger --max-batch"
        )


def connect_body(
    config: BodyConfig,
    manifest: Manifest,
    remote: type[RemoteBody] = RemoteBody,
    local: Callable[[], BodyScheduler] | None = None,
) -> BodyClient:
    """A new body session: over the network to `config.server`, else in this process.

    `remote` picks the client class (split diffusion's RemoteUNet); `local` builds the in-process
    scheduler when it is not a text body of `config.source`.
    """
    if config.server:
        body: BodyClient = remote(
            config.server, manifest, config.codec, token=config.token, tls_ca=config.tls_ca,
            timeout=config.timeout, connect_timeout=config.connect_timeout, reconnect_window=config.reconnect_window,
        )
    else:  # the engine is imported only here: a device with a server never loads it
        from lambdasplit.engine.local import LocalBody, shared_scheduler

        scheduler = local() if local else shared_scheduler(
            config.source, config.split, config.dtype, config.device, config.allow_shallow
        )
        body = LocalBody(scheduler, config.codec)
    if config.capture:
        body.start_capture()
    return body

