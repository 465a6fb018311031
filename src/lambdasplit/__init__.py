"""lambdasplit: split inference of generative models — head and tail on the device, body in the cloud.

    from lambdasplit import SplitModelForCausalLM
    model = SplitModelForCausalLM.from_pretrained(None, split=(2, 2))  # embedded SmolLM2; body="ws://..." for a server
    tok = model.split_device.tokenizer
    answer = tok.decode(model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=8)[0])
"""

import os

# Head, body and tail take turns: while one process waits on the network the other computes. OpenMP
# threads that spin after each op would steal the cores the other side needs (measured on 2 cores:
# loopback decode 0.84x -> 0.97x of unsplit; docs/benchmarks.md). Set before torch is imported;
# an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lambdasplit.device.body import BodyClient, LocalBody, load_local_body  # noqa: E402
from lambdasplit.device.generation import GenerationOptions, GenerationResult, generate_ids  # noqa: E402
from lambdasplit.device.model import (
    SplitCache,  # noqa: E402
    SplitModelForCausalLM,  # noqa: E402
)
from lambdasplit.device.runtime import SplitDevice  # noqa: E402
from lambdasplit.split.spec import SplitSpec  # noqa: E402
from lambdasplit.wire.codec import Codec  # noqa: E402

__all__ = [
    "BodyClient",
    "Codec",
    "GenerationResult",
    "GenerationOptions",
    "LocalBody",
    "SplitCache",
    "SplitDevice",
    "SplitModelForCausalLM",
    "SplitSpec",
    "generate_ids",
    "load_local_body",
]
__version__ = "0.1.0"
