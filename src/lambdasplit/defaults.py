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
STEP_WAIT_SECONDS = 0.002  # a step waits this long after the latest of the last step's sessions came back (engine.scheduler._gather)
STEP_RETRIES = 1  # a failed batched step runs again this many times before its sessions are closed
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

# The CLI's other defaults (its --help shows each). Library code that has the same setting reads it
# from here too: split/load.py (SPLIT), privacy/audit.py, privacy/pii_audit.py, device/train_draft.py,
# device/sampling.py and device/draft.py (DRAFT_TOKENS, DRAFT_CONFIDENCE), the gateway's and the UI's apps.
HOST = "127.0.0.1"  # every server binds loopback unless told otherwise
DEVICE = "cpu"  # torch device the parts run on
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"  # the model used when none is given
SPLIT = (2, 2)  # K layers in the head, M in the tail
CODEC = "fp32"  # wire codec of hidden states (exact)
MAX_NEW_TOKENS = 128  # generate
DEMO_MAX_NEW_TOKENS = 64
DEMO_PROMPT = "What is the capital of France?"
REPETITION_PENALTY = 1.0  # none
# --draft-tokens: prompt lookup's and a draft model's first draft length (they then adapt to acceptance), and the
# draft head's longest chain (a fixed cap). 3: over the netem proxy on 2 CPU cores the shipped head drafting up to 3
# ran 1.26x plain decoding at 50 ms RTT and 1.34x at 100 ms, up to 8 1.11x and 1.27x (`python -m benchmarks
# speculative --draft-lengths 3,8`): longer chains add rejected positions faster than accepted tokens.
DRAFT_TOKENS = 3
# --speculate draft-tree: the static tree's drafted tokens. Over the netem proxy on 2 CPU cores (`python -m benchmarks
# speculative --draft-lengths 3 --trees 16,32`) 32 gave 2.83 tokens per round trip, 1.57x plain at 50 ms and 1.75x at
# 100 ms; 16 gave 2.47, 1.51x and 1.65x; the chain of up to 3 1.92, 1.31x and 1.42x.
DRAFT_TREE_NODES = 32
# ... and its depth at most: each depth is one draft-head pass a round (on one H100, 2.4 ms of launches each: 19 ms for
# the 8-deep tree of 32). Counted offline on 8 held-out prompts (`python -m benchmarks draft-tree --prompts 8
# --new-tokens 96 --calibration 8`), the tree of 32 capped at depth 4 gave the uncapped one's tokens per round trip
# with 4 passes instead of 8.
DRAFT_TREE_DEPTH = 4
MAX_TREE_POSITIONS = 64  # positions of one TREE frame the body verifies (the root, re-sent tokens and the drafts)
DRAFT_CONFIDENCE = 0.1  # a draft head's chain stops at a token the head gives less than this probability (greedy)
NOISE_ON = "all"  # positions the --noise defense perturbs: all, prompt or decode
GATEWAY_CONVERSATIONS = 16  # finished conversations whose body session is kept for a follow-up
# The UI gives up on an unreachable server within seconds, so the page says why instead of waiting.
UI_CONNECT_TIMEOUT = 5.0
UI_RECONNECT_WINDOW = 5.0
CERT_HOSTS = ("localhost", "127.0.0.1")
TENSOR_PARALLEL = 1  # GPUs one body is cut over

# Split diffusion
DIFFUSION_MODE = "paper"  # the cloud runs the whole UNet; "unet-split": only its inner blocks
UNET_OUTER_BLOCKS = 1  # unet-split: outer down/up blocks kept on the device
IMAGE_STEPS = 20
IMAGE_GUIDANCE = 5.0
IMAGE_SEED = 0
IMAGE_OUT = "image.png"

# Privacy audit
AUDIT_SPLITS = ((1, 1), (2, 2), (4, 4), (8, 8))
AUDIT_OUT = "audit"
AUDIT_MAX_NEW_TOKENS = 24
INVERSION_STEPS = 300  # training steps of the learned inverter, per K
AUDIT_IMAGE_PROMPT = "a lighthouse at dusk, oil painting"
PII_PROMPT_SET = "heldout"  # or "tune"
PII_DECOYS = (1, 3, 7)  # decoy counts the identifier audit measures
PII_ATTACK_PROMPTS = 12  # prompts whose frames are attacked (vocabulary matching costs seconds each)

# Draft-head training (train-draft)
DRAFT_PROMPT_COUNT = 6000  # generated prompts when no --prompts file is given
DRAFT_EPOCHS = 6  # at most; a time budget may stop sooner
DRAFT_MAX_NEW_TOKENS = 128
DRAFT_SAMPLED = 0.0  # share of the prompts that also get a sampled answer
DRAFT_TEMPERATURE = 0.7  # of those sampled answers
DRAFT_GEN_BATCH = 32  # prompts answered at once
DRAFT_BATCH = 16  # sequences per training step
DRAFT_LR = 1e-3
AUDIT_ATTACKS = ("tail-replay", "vocab-matching", "split-probing", "learned-inversion")  # all of them

# Generations one gateway or UI runs at once, each on a worker thread (torch releases the GIL while
# it computes); a request beyond them waits for a thread rather than starting another.
GENERATION_THREADS = 32
