"""lambdasplit: split inference of generative models — head and tail on the device, body in the cloud.

    from transformers import AutoTokenizer
    from lambdasplit import SplitModelForCausalLM
    model = SplitModelForCausalLM.from_pretrained(None, split=(2, 2))  # embedded SmolLM2; body="ws://..." for a server
    tok = AutoTokenizer.from_pretrained(model.name_or_path)
    answer = tok.decode(model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=8)[0])

Importing the package loads the device side only: `LocalBody` and `load_local_body` (the body in
this process) come from `lambdasplit.engine.local` when first used, so a device that reaches its
body over the network never loads the server's engine.
"""

import os
from typing import Any

# Head, body and tail take turns: while one process waits on the network the other computes. OpenMP
# threads that spin after each op would steal the cores the other side needs (measured on 2 cores:
# loopback decode 0.84x -> 0.97x of unsplit; docs/benchmarks.md). Set before torch is imported;
# an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lambdasplit.device.body import BodyClient  # noqa: E402
from lambdasplit.device.generation import GenerationOptions, GenerationResult, generate_ids  # noqa: E402
from lambdasplit.device.model import SplitCache, SplitModelForCausalLM  # noqa: E402
from lambdasplit.device.runtime import SplitDevice  # noqa: E402
from lambdasplit.device.tokens import PromptTokenizer  # noqa: E402
from lambdasplit.split.spec import SplitSpec  # noqa: E402
from lambdasplit.wire.codec import Codec  # noqa: E402

_ENGINE = ("LocalBody", "load_local_body")  # the in-process body: imported on first use


def __getattr__(name: str) -> Any:
    if name in _ENGINE:
        from lambdasplit.engine import local

        return getattr(local, name)
    raise AttributeError(f"module 'lambdasplit' has no attribute {name!r}")


__all__ = [
    "BodyClient",
    "Codec",
    "GenerationResult",
    "GenerationOptions",
    "LocalBody",
    "PromptTokenizer",
    "SplitCache",
    "SplitDevice",
    "SplitModelForCausalLM",
    "SplitSpec",
    "generate_ids",
    "load_local_body",
]
__version__ = "0.1.0"
