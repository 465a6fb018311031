"""Every default a user can override, defined once: ports, server limits, frame sizes, timeouts.

The CLI's options, `ServerConfig`, `SchedulerLimits` and `BodyConfig` all read these, so a default
changed here changes everywhere.
"""

SERVE_PORT = 8470
GATEWAY_PORT = 8471
UI_PORT = 8472

MAX_SESSIONS = 64
MAX_CONTEXT = 4096  # positions per session where the model states no window (serve defaults to the model's)
MAX_BATCH = 16  # rows per session
# Positions (B x T) one frame may ask for. One frame runs on the compute thread while every other
# session waits, so this bounds the stall: 4,096 positions of SmolLM2's 26-layer body take about
# 2 s on 2 CPU cores; a 61 MiB frame of ~29,000 positions took 52-91 s before this bound existed.
MAX_FRAME_POSITIONS = 4096
# Positions one batched body step runs: every session's decode position, then prefill chunks up to
# this budget. A step of up to a few hundred positions costs a GPU about what one decode step
# costs (both stream the weights once; 7B in bf16 on an H100 turns compute-bound near 300), so 256
# keeps other sessions' inter-token latency flat while a prompt prefills. Two CPU cores are
# compute-bound from the first position, so there the chunk is 64 (~4 decode steps' time).
STEP_TOKENS = 256
STEP_TOKENS_CPU = 64
STEP_WAIT_SECONDS = 0.002  # a step waits this long at most for the last step's sessions (engine.scheduler._gather)
KV_WAIT_SECONDS = 10.0  # how long a frame waits for KV pool space before a capacity error
MAX_SESSION_KV_MIB = 1024  # KV cache bytes one session may hold on the server
MIN_FREE_MEMORY_MIB = 512  # refuse a session, or a frame, that would leave less than this free
SESSION_TTL = 300.0  # idle seconds before the server closes a session
HANDSHAKE_TIMEOUT = 10.0
MAX_FRAME_BYTES = 64 << 20
CAPACITY_RETRY_AFTER = 2.0  # seconds the server suggests after a capacity refusal
# A compute loop that spends longer than this in one step while work waits reads as wedged:
# /healthz answers 503 (a load balancer stops sending devices). A prefill chunk takes well under
# a second on a GPU and a few seconds on 2 CPU cores; a hung collective never ends.
STALL_TIMEOUT_SECONDS = 60.0
SHUTDOWN_TIMEOUT = 30.0  # seconds a server's shutdown waits for the compute thread's current step

CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 60.0  # seconds a device waits for the body's reply (over the network or in process)
RECONNECT_WINDOW = 30.0  # seconds a device keeps trying to reach a lost body server
# What a device sends ahead of the oldest reply it has not read yet (a replay resends thousands of
# frames). The server answers one frame at a time and awaits each send, so a device that sent
# everything first wedged both ends once websockets' flow control stopped them reading. Fewer
# frames than websockets' receive queue (16 messages, both ends) means neither end ever stops
# reading; the bytes bound what waits at the server per session (a larger frame goes alone).
SEND_WINDOW_FRAMES = 8
SEND_WINDOW_BYTES = 4 << 20

# Generations one gateway or UI runs at once, each on a worker thread (torch releases the GIL while
# it computes); a request beyond them waits for a thread rather than starting another.
GENERATION_THREADS = 32
