"""Commands that serve: serve (the body), gateway (the OpenAI API), ui (the web UI), certs (TLS to try them)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from lambdasplit import defaults
from lambdasplit.commands.options import (
    BlocksOpt,
    CaOpt,
    CodecOpt,
    DeviceOpt,
    DraftOpt,
    DtypeOpt,
    HttpPortOpt,
    ModelOpt,
    ModeOpt,
    PipelineOpt,
    PortOpt,
    QuantizeOpt,
    RangeSplitOpt,
    ReconnectOpt,
    ServerOpt,
    ShallowOpt,
    SpeculateOpt,
    SplitOpt,
    TokenOpt,
    body_client,
    check_local_body,
    check_positive,
    check_server,
    check_text_file,
    point,
    warn_without_chat_template,
)
from lambdasplit.errors import LambdaSplitError

if TYPE_CHECKING:
    from lambdasplit.cloud.frontends import FrontEndSpec
    from lambdasplit.cloud.server import BodyServer, ServerConfig
    from lambdasplit.engine.optimize import BodyOptions
    from lambdasplit.split.spec import SplitChoice

BodyDtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="float32, bfloat16 or float16: what the body (with --pipeline, the UNet) computes in and sends "
    "back; devices must use the same --dtype. Default: an exported part's own, else float32 (a .gguf model too).",
)]


def serve(
    part: Annotated[Optional[Path], typer.Option("--part", help="Exported cloud part (DIR/cloud).")] = None,
    model: ModelOpt = None,
    split: RangeSplitOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback requires a token.")] = defaults.HOST,
    port: PortOpt = defaults.SERVE_PORT,
    token_file: TokenOpt = None,
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="Server private key (PEM).")] = None,
    tls_key_password_file: Annotated[Optional[Path], typer.Option(
        "--tls-key-password-file", help="File whose first line is the passphrase of an encrypted --tls-key (the server never prompts).")] = None,
    max_sessions: Annotated[int, typer.Option("--max-sessions", min=1, help="Concurrent sessions.")] = defaults.MAX_SESSIONS,
    session_ttl: Annotated[float, typer.Option(
        "--session-ttl", callback=check_positive, help="Idle seconds before a session expires."
    )] = defaults.SESSION_TTL,
    max_context: Annotated[Optional[int], typer.Option(
        "--max-context", min=1, help="Positions per session row (default: the model's context window)."
    )] = None,
    min_free_memory_mb: Annotated[int, typer.Option("--min-free-memory", min=0, help="Refuse sessions below this many MiB free.")] = defaults.MIN_FREE_MEMORY_MIB,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Rows (B) per session.")] = defaults.MAX_BATCH,
    max_frame_positions: Annotated[int, typer.Option(
        "--max-frame-positions", min=1, help="Positions (B x T) per frame; bounds how long one frame holds the compute thread."
    )] = defaults.MAX_FRAME_POSITIONS,
    max_session_kv: Annotated[int, typer.Option(
        "--max-session-kv", min=1, help="MiB of body KV cache one session may hold."
    )] = defaults.MAX_SESSION_KV_MIB,
    step_tokens: Annotated[int | None, typer.Option(
        "--step-tokens", min=1,
        help="Positions one batched body step runs: every session's decode step, then prefill chunks up to this "
             f"budget (default {defaults.STEP_TOKENS} on a GPU, {defaults.STEP_TOKENS_CPU} on the CPU).",
    )] = None,
    kv_pool: Annotated[int | None, typer.Option(
        "--kv-pool", min=1,
        help="MiB of the KV pool every session's body cache lives in (default: what --max-sessions sessions at "
             "--max-session-kv need, capped at 90% of free GPU memory or half the free host memory).",
    )] = None,
    cuda_graphs: Annotated[bool, typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="On a GPU, replay captured batched steps (CUDA graphs): decode steps, and with the paged kernel steps "
             "whose chunks have up to 64 positions per row (verification frames, short prompts)."
    )] = True,
    compile_body: Annotated[bool, typer.Option(
        "--compile/--no-compile",
        help="torch.compile the body's norms and MLPs at start-up (fused kernels; attention stays eager) and run "
             "them once on a tiny input, so a compiler that cannot work (on the CPU: no working C++ compiler) stops "
             "start-up with one error. Not with --pipeline or --tensor-parallel.",
    )] = False,
    body_quantize: Annotated[Optional[str], typer.Option(
        "--quantize", help="Body weights as fp8 (torchao; --device cuda, GPUs of compute capability 8.9+: Hopper, "
                           "Ada). Changes the hidden states a little: docs/benchmarks.md measures by how much. Off by "
                           "default; not with --pipeline, --tensor-parallel or a K range.",
    )] = None,
    paged_kernel: Annotated[bool, typer.Option(
        "--paged-kernel/--no-paged-kernel",
        help="On a GPU with Triton, decode rows and chunks of up to 64 positions per row attend through "
             "lambdasplit's paged kernel, which reads the KV pool in place (no gathered copy of the keys; CUDA graphs "
             "per row count, not per key length). --no-paged-kernel: gather the keys and attend with SDPA, as longer "
             "prefill chunks always do; only decode steps are then captured.",
    )] = True,
    kv_wait: Annotated[float, typer.Option(
        "--kv-wait", min=0, help="Seconds a frame waits for KV pool space before a capacity error."
    )] = defaults.KV_WAIT_SECONDS,
    step_wait: Annotated[float, typer.Option(
        "--step-wait", min=0,
        help="Milliseconds the next batched step waits for more of the sessions the last step answered, after "
             "the latest of them sent its next frame (before the first: up to one forward); fewer, fuller steps; "
             "0: start on whatever has arrived.",
    )] = defaults.STEP_WAIT_SECONDS * 1000,
    async_schedule: Annotated[Optional[bool], typer.Option(
        "--async-schedule/--no-async-schedule",
        help="Plan the next batched step while the device runs this one. Default: on with --device cuda (one H100, "
             "64 sessions: 2,115 tok/s against 1,899), off on the CPU (there the forward has ended when it returns, "
             "so it only delays replies).",
    )] = None,
    stall_timeout: Annotated[float, typer.Option(
        "--stall-timeout", callback=check_positive,
        help="Seconds the compute loop may spend in one step before /healthz answers 503 (a wedged engine).",
    )] = defaults.STALL_TIMEOUT_SECONDS,
    uvloop: Annotated[bool, typer.Option(
        "--uvloop/--no-uvloop", help="Run the network on uvloop's event loop (C; less host time per frame) when it is installed."
    )] = True,
    engine_process: Annotated[bool, typer.Option(
        "--engine-process/--in-process",
        help="Run the scheduler and the model in their own process, apart from the network front end (not with "
             "--tensor-parallel). Off by default: measured, it still costs throughput (one H100, 64 sessions: "
             "1,784 tok/s against 1,899 in one process; on 2 CPU cores 13-26%).",
    )] = False,
    front_ends: Annotated[int, typer.Option(
        "--front-ends", min=1, max=64,
        help="Network front-end processes sharing the port (Linux SO_REUSEPORT; the kernel spreads connections over "
             "them), each with its own pipe to one engine process (so more than 1 implies --engine-process). "
             "/metrics answers for all of them. Not with --tensor-parallel. Off by default: measured (one H100, 64 "
             "sessions), 4 front ends served 2,035 tok/s against 2,498 in one process.",
    )] = 1,
    device: DeviceOpt = defaults.DEVICE,
    dtype: BodyDtypeOpt = None,
    insecure_no_auth: Annotated[bool, typer.Option("--insecure-no-auth", help="Allow a non-loopback bind without a token.")] = False,
    allow_shallow: ShallowOpt = False,
    pipeline: PipelineOpt = None,
    mode: ModeOpt = defaults.DIFFUSION_MODE,
    k: BlocksOpt = defaults.UNET_OUTER_BLOCKS,
    tensor_parallel: Annotated[int, typer.Option(
        "--tensor-parallel", min=1,
        help="Cut the body's layers over this many GPUs of this host (with --device cuda: torch.distributed over "
             "NCCL, one GPU a rank; with --device cpu, CPU processes over gloo, as the tests run it); relaunches "
             "itself under torchrun once every option is checked, rank 0 serves the network. Not with --compile, "
             "--quantize, --pipeline, --engine-process or a K range.",
    )] = defaults.TENSOR_PARALLEL,
) -> None:
    """Serve the body to devices over WebSocket (one persistent connection per device): a language
    model's middle layers, or with --pipeline a diffusion UNet (paper) or its inner blocks (unet-split)."""
    from lambdasplit.cloud.frontends import FrontEndSpec
    from lambdasplit.cloud.server import BodyServer, ServerConfig
    from lambdasplit.engine.loading import check_gpus, follow_leader, load_scheduler
    from lambdasplit.engine.optimize import BodyOptions
    from lambdasplit.engine.scheduler import SchedulerLimits
    from lambdasplit.listen import check_bindable
    from lambdasplit.security import is_loopback, read_key_password, read_token, server_ssl_context

    # Every check comes before anything loads and before --tensor-parallel relaunches this command
    # under torchrun: a bad combination is one line, never N ranks' tracebacks.
    source = str(part) if part else model
    options = BodyOptions(compile_body, body_quantize, paged_kernel)
    k_max = split.k_max if split and split.ranged else None
    _check_combinations(part, model, split, k_max, pipeline, options, device, tensor_parallel, engine_process, front_ends)
    check_gpus(device, tensor_parallel)
    token = read_token(token_file)
    if token is None and not is_loopback(host) and not insecure_no_auth:
        raise LambdaSplitError(
            f"refusing to serve on {host} without authentication; pass --token-file F "
            "(or --insecure-no-auth on a network you trust)"
        )
    check_bindable(host, port)  # a taken port fails in a second, not after the model loaded
    key_password = read_key_password(tls_key_password_file)
    tls = server_ssl_context(tls_cert, tls_key, key_password)  # so does a wrong certificate or key (spawned front ends load them again)
    tp = None
    if tensor_parallel > 1:
        from lambdasplit.engine.parallel import TensorParallel

        tp = TensorParallel.join(tensor_parallel, device, ["-m", "lambdasplit.cli", *sys.argv[1:]])  # torchrun runs this command
        if not tp.leader:
            follow_leader(source, point(split), dtype, tp, allow_shallow)
            return
    limits = SchedulerLimits(
        max_sessions, max_context, min_free_memory_mb << 20, max_batch, max_frame_positions, max_session_kv << 20,
        step_tokens, kv_pool << 20 if kv_pool else None, kv_wait, step_wait / 1000, stall_timeout,
        async_schedule if async_schedule is not None else device == "cuda",
    )
    if pipeline is not None:
        from lambdasplit.diffusion.cloud import load_diffusion_scheduler

        build, args = load_diffusion_scheduler, (pipeline, mode, k, dtype, device, limits)
    else:
        build, args = load_scheduler, (source, point(split), dtype, device, limits, allow_shallow, k_max, cuda_graphs, tp, options)
    config = ServerConfig(host, port, token, tls, session_ttl, reuse_port=front_ends > 1)
    if front_ends > 1:
        _serve_front_ends(config, front_ends, FrontEndSpec(host, port, token, tls_cert, tls_key, session_ttl, uvloop, key_password),
                          build, args)
        return
    if engine_process:
        from lambdasplit.engine.core import EngineClient

        scheduler = EngineClient.start(build, *args, max_frame_bytes=config.max_frame_bytes, setup=_child_logging())
    else:
        scheduler = build(*args)
    server = BodyServer(scheduler, config)
    server.serve_forever(uvloop, functools.partial(_announce, server))


def _announce(server: BodyServer, before: Callable[[], None] = lambda: None) -> None:
    """The one line that says the server is up (tests and scripts wait for it), after `before()`."""
    before()
    typer.echo(f"lambdasplit body server listening on {server.url} ({server.serving})")
    sys.stdout.flush()


def _child_logging() -> Callable[[], None]:
    """This process's logging set-up, for the processes it spawns (the engine, front ends)."""
    from lambdasplit.logs import configure_logging

    return functools.partial(configure_logging, logging.getLogger().level <= logging.INFO)


def _serve_front_ends(config: ServerConfig, count: int, spec: FrontEndSpec, build: Callable, args: tuple) -> None:
    """`--front-ends N`: one engine process, this process's front end and N-1 spawned ones on one
    port (claimed first: `claim_shared_port`), their metrics in one temporary directory. Ctrl-C and
    SIGTERM both stop the front ends, then the engine, and remove the directory (`sigterm_unwinds`)."""
    import shutil
    import signal
    import tempfile

    from lambdasplit.cloud.frontends import FrontEnds, sigterm_unwinds
    from lambdasplit.cloud.metrics import share_between_processes
    from lambdasplit.cloud.server import BodyServer
    from lambdasplit.engine.core import EngineClient
    from lambdasplit.listen import claim_shared_port

    claim = claim_shared_port(config.port)
    shared = tempfile.mkdtemp(prefix="lambdasplit-metrics-")
    share_between_processes(shared)  # before the first metric, and inherited by the spawned processes
    scheduler: EngineClient | None = None
    others: FrontEnds | None = None
    with sigterm_unwinds():
        try:
            setup = _child_logging()
            scheduler = EngineClient.start(build, *args, max_frame_bytes=config.max_frame_bytes, setup=setup,
                                           front_ends=count)
            server = BodyServer(scheduler, config)
            others = FrontEnds(scheduler.links, setup)
            start = lambda: others.start(dataclasses.replace(spec, port=server.port))  # noqa: E731 - port 0 is now real
            server.serve_forever(spec.use_uvloop, functools.partial(_announce, server, start))
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # after Ctrl-C too: a SIGTERM must not cut this short
            if others is not None:
                others.stop()
            if scheduler is not None:
                scheduler.shutdown()  # after the front ends, which would each log the engine's end as an error
            shutil.rmtree(shared, ignore_errors=True)
            if claim is not None:
                claim.close()


def _check_combinations(part: Path | None, model: str | None, split: SplitChoice | None, k_max: int | None,
                        pipeline: str | None, options: BodyOptions, device: str, ranks: int, engine_process: bool,
                        front_ends: int = 1) -> None:
    """The serve options that cannot go together, refused before anything loads."""
    from lambdasplit.engine.loading import check_body_options

    if part is not None and model is not None:
        raise LambdaSplitError("give either --part or --model, not both")
    if pipeline is not None:
        if part is not None or model is not None or split is not None:
            raise LambdaSplitError("--pipeline serves a diffusion UNet; drop --part, --model and --split")
        if ranks > 1:
            raise LambdaSplitError("--tensor-parallel serves text bodies only; drop --pipeline")
        if options.compile or options.quantize:
            raise LambdaSplitError("--compile and --quantize apply to a text body; drop them with --pipeline")
    if ranks > 1 and engine_process:
        raise LambdaSplitError("--engine-process runs one process's body; drop it with --tensor-parallel")
    if front_ends > 1 and ranks > 1:
        raise LambdaSplitError("--front-ends needs the engine in its own process, which --tensor-parallel does not run; "
                               "drop one of them")
    if front_ends > 1 and not sys.platform.startswith("linux"):
        raise LambdaSplitError(f"--front-ends shares the port with SO_REUSEPORT, which spreads connections on Linux "
                               f"only (this is {sys.platform})")
    check_body_options(options, k_max, ranks)
    if options.quantize and not device.startswith("cuda"):
        raise LambdaSplitError(f"--quantize {options.quantize} needs --device cuda (a GPU of compute capability 8.9+)")


def gateway(
    server: Annotated[str, typer.Option("--server", callback=check_server, help="Body server URL, ws://HOST:PORT or wss://HOST:PORT.")],
    model: ModelOpt = None,
    split: SplitOpt = None,
    host: Annotated[str, typer.Option(help="Address for the HTTP API (keep it on loopback).")] = defaults.HOST,
    port: HttpPortOpt = defaults.GATEWAY_PORT,
    token_file: TokenOpt = None,
    tls_ca: CaOpt = None,
    reconnect_window: ReconnectOpt = defaults.RECONNECT_WINDOW,
    codec: CodecOpt = defaults.CODEC,
    api_key_file: Annotated[Optional[Path], typer.Option("--api-key-file", callback=check_text_file, help="Require this key from API clients.")] = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    speculate: SpeculateOpt = None,
    draft_tokens: DraftOpt = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Model id for API clients (default: the model file's or directory's name).")] = None,
    conversations: Annotated[int, typer.Option(min=0, help="Conversations whose body session is kept for their next turn (0: off); each holds a session on the body server.")] = defaults.GATEWAY_CONVERSATIONS,
    pseudonymize: Annotated[bool, typer.Option("--pseudonymize", help="Defense: replace names, e-mails, numbers and other identifiers in chat requests with stand-ins on the device and restore them in the answer (see docs/gateway.md).")] = False,
    decoys: Annotated[int, typer.Option("--decoys", min=0, max=defaults.MAX_BATCH - 1, help="Defense: run each chat request among N decoy rows that differ in its identifiers (every row runs to max_tokens).")] = 0,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /health) backed by split inference; see docs/gateway.md."""
    import uvicorn

    from lambdasplit.device.connect import BodyConfig, connect_body
    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.gateway.app import create_app, default_model_name
    from lambdasplit.gateway.protected import flags as protected_flags
    from lambdasplit.listen import check_bindable
    from lambdasplit.privacy.protect import Protection
    from lambdasplit.security import is_loopback, read_token
    from lambdasplit.wire.codec import Codec

    api_key = read_token(api_key_file)
    if api_key is None and not is_loopback(host):
        raise LambdaSplitError(f"refusing to expose the gateway on {host} without --api-key-file")
    check_bindable(host, port)  # one line now, not a banner and then uvicorn's raw [Errno 98]
    runtime = SplitRuntime.load(model, point(split), dtype, quantize=quantize)
    warn_without_chat_template(runtime)
    config = BodyConfig.from_options(server, token_file, tls_ca=tls_ca, codec=Codec.parse(codec),
                                     reconnect_window=reconnect_window)
    connect = functools.partial(connect_body, config, runtime.manifest)  # one body session per request
    name = model_name or default_model_name(model, runtime.opened.exported is not None)
    protection = Protection(pseudonymize, decoys)
    defenses = f", defenses: {protected_flags(protection)}" if protection.active else ""
    typer.echo(f"lambdasplit gateway: http://{host}:{port}/v1 (model {name}{defenses}) -> body at {server}")
    app_ = create_app(runtime, connect, name, api_key, speculate=speculate, draft_tokens=draft_tokens, conversations=conversations,
                      protection=protection)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def ui(
    server: ServerOpt = None,
    model: ModelOpt = None,
    split: SplitOpt = None,
    host: Annotated[str, typer.Option(help="Address for the web page (keep it on loopback).")] = defaults.HOST,
    port: HttpPortOpt = defaults.UI_PORT,
    token_file: TokenOpt = None,
    tls_ca: CaOpt = None,
    codec: CodecOpt = defaults.CODEC,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    pipeline: PipelineOpt = None,
    image_server: Annotated[Optional[str], typer.Option("--image-server", callback=check_server, help="Body server for the image tab (started with serve --pipeline); default: in this process.")] = None,
    image: Annotated[bool, typer.Option("--image/--no-image", help="Enable the image tab.")] = True,
    speculate: SpeculateOpt = None,
    draft_tokens: DraftOpt = None,
    pseudonymize: Annotated[bool, typer.Option("--pseudonymize", help="Defense: chats are pseudonymised on the device (identifiers replaced by stand-ins, restored in the answer); the panel shows what the cloud can recover.")] = False,
    decoys: Annotated[int, typer.Option("--decoys", min=0, help="Defense: each chat runs among N decoy rows that differ in its identifiers.")] = 0,
) -> None:
    """Serve the web UI: chat and image generation through the split model, showing what crosses the network."""
    import uvicorn

    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.diffusion.device import SplitPipelines
    from lambdasplit.listen import check_bindable
    from lambdasplit.security import is_loopback, read_token
    from lambdasplit.ui.app import create_ui, load_audit
    from lambdasplit.wire.codec import Codec

    if not is_loopback(host):
        raise LambdaSplitError(f"the UI has no login; refusing to serve it on {host} (keep it on 127.0.0.1)")
    check_bindable(host, port)
    check_local_body(model, server, decoys)
    token = read_token(token_file)
    wire = Codec.parse(codec)
    parts = point(split)
    runtime = SplitRuntime.load(model, parts, dtype, quantize=quantize)
    warn_without_chat_template(runtime)

    def connect():  # one body session per conversation of the page
        return body_client(runtime, model, parts, dtype, wire, False, server, token_file, tls_ca,
                     connect_timeout=defaults.UI_CONNECT_TIMEOUT, reconnect_window=defaults.UI_RECONNECT_WINDOW)

    connect().close()  # an in-process body loads now rather than on the first message; a remote one connects lazily
    images = SplitPipelines(pipeline, image_server, token, tls_ca, wire)
    info = {"model": model or defaults.EMBEDDED_MODEL, "server": server, "image_server": image_server, "image_note": images.note}
    audit = load_audit(runtime.spec) if model is None else None
    typer.echo(f"lambdasplit UI: http://{host}:{port}/ (body {'at ' + server if server else 'in this process'})")
    sys.stdout.flush()
    from lambdasplit.privacy.protect import Protection

    protection = Protection(pseudonymize, decoys) if pseudonymize or decoys else None
    app_ = create_ui(runtime, connect, info, images if image else None, audit, speculate=speculate, draft_tokens=draft_tokens,
                     protection=protection)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def certs(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for ca.pem, server.pem, server-key.pem.")],
    host: Annotated[Optional[list[str]], typer.Option("--host", help="Name or IP the certificate is for (repeatable).")] = None,
) -> None:
    """Make a self-signed CA and a server certificate, for trying TLS out."""
    from lambdasplit.security import make_certificates

    try:
        paths = make_certificates(out, host or list(defaults.CERT_HOSTS))
    except OSError as exc:
        raise LambdaSplitError(f"cannot write the certificates to {out}: {exc.strerror or exc}") from None
    typer.echo(f"CA: {paths['ca']}\ncertificate: {paths['cert']}\nkey: {paths['key']}")
