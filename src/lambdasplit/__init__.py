"""lambdasplit: split inference of generative models — head and tail on the device, body in the cloud.

    from transformers import AutoTokenizer
    from lambdasplit import SplitModelForCausalLM
    model = SplitModelForCausalLM.from_pretrained(None, split=(2, 2))  # embedded SmolLM2; body="ws://..." for a server
    tok = AutoTokenizer.from_pretrained(model.name_or_path)
    answer = tok.decode(model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=8)[0])

Every exported name is imported on first use (PEP 562), and only from the device side, except
`LocalBody` and `load_local_body` (the body in this process, `lambdasplit.engine.local`): a device
that reaches its body over the network never loads the server's engine.
"""

import os

# Head, body and tail take turns: while one process waits on the network the other computes. OpenMP
# threads that spin after each op would steal the cores the other side needs (measured on 2 cores:
# loopback decode 0.84x -> 0.97x of unsplit; docs/benchmarks.md). Set before torch is imported;
# an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib

# Exported names, imported on first use (PEP 562): `import lambdasplit` (and every CLI start, even
# `lambdasplit --help`) no longer imports torch and transformers up front (--help: 3 s -> 0.3 s).
_EXPORTS = {
    "BodyClient": "lambdasplit.device.body",
    "LocalBody": "lambdasplit.engine.local",  # the in-process body: the engine loads only when asked for
    "load_local_body": "lambdasplit.engine.local",
    "SamplingParams": "lambdasplit.device.sampling",
    "GenerationResult": "lambdasplit.device.generation",
    "generate_ids": "lambdasplit.device.generation",
    "SplitCache": "lambdasplit.device.model",
    "SplitModelForCausalLM": "lambdasplit.device.model",
    "SplitRuntime": "lambdasplit.device.runtime",
    "PromptTokenizer": "lambdasplit.device.tokens",
    "SplitSpec": "lambdasplit.split.spec",
    "Codec": "lambdasplit.wire.codec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lambdasplit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"
