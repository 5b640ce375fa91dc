"""Run by another Python (transformers 4.x, no dms-llm): load checkpoints, record logits and generations.

    python eval/transformers_client.py OUT.pt TOKENS_JSON FOLDER [FOLDER ...]

Writes {"version": ..., "results": {folder: {"logits", "generated"} or {"error"}}} with torch.save.
"""

import importlib.util
import json
import sys

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM


def run(folder: str, tokens: torch.Tensor) -> dict:
    try:
        # the argument's name changed in 4.56 (``dtype``); 5.x no longer takes the old one
        newer = Version(transformers.__version__) >= Version("4.56")
        dtype = {"dtype" if newer else "torch_dtype": torch.float32}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **dtype)
        model.eval()
        with torch.no_grad():
            logits = model(tokens).logits
            generated = model.generate(tokens, max_new_tokens=8, do_sample=False, pad_token_id=0)
        return {"logits": logits, "generated": generated[:, tokens.shape[1] :]}
    except Exception as error:  # recorded: the test decides whether this version had to load it
        return {"error": f"{type(error).__name__}: {error}"[:500]}


if __name__ == "__main__":
    assert importlib.util.find_spec("dms_llm") is None, "dms_llm must not be importable here"
    out, tokens = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    results = {folder: run(folder, tokens) for folder in sys.argv[3:]}
    torch.save({"version": transformers.__version__, "results": results}, out)
